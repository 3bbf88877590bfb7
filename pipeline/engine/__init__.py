"""The engine layer shared by the stages (pretrain and fine-tune): what a training loop needs that
is not one stage's own. :mod:`rnnpipe.pipeline.engine.schedule`: the learning rate as a pure
function of the step."""
