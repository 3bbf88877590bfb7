"""The fine-tune stage: SST-2, CoNLL-2003 NER and PTB from a pretrained recurrent LM.

Not built yet (the fine-tuning issue).
"""
