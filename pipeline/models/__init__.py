"""Recurrent language models: LRN, oLRN, minGRU, minLSTM, SRU, ATR, LSTM, GRU, attention.

Not built yet (the model zoo issue). Models will know nothing of DeepSpeed or Slurm.
"""
