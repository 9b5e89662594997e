"""Model surgery: pick target modules, replace them, and run a model block by block
(sequential calibration) so each block is compressed on its compressed predecessor's outputs."""
from shrink.surgery.capture import BlockInputs, SequentialRunner, capture_block_inputs, find_blocks
from shrink.surgery.fold import FoldSource, find_fold_source, fold_into
from shrink.surgery.patches import conv_patches
from shrink.surgery.replace import get_module, replace_module, undo
from shrink.surgery.select import Selection, Skipped, Target, kind_of, select_modules

__all__ = [
    "BlockInputs", "SequentialRunner", "capture_block_inputs", "find_blocks",
    "FoldSource", "find_fold_source", "fold_into",
    "conv_patches",
    "get_module", "replace_module", "undo",
    "Selection", "Skipped", "Target", "kind_of", "select_modules",
]
