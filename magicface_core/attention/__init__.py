"""RSA and RBA: the maths (`ops`, `bias`, `folded`), what a call shares with its
processors (`state`), and the diffusers processors (`processors`)."""

from .bias import masks_for_grid, rba_bias, rba_table, reference_bias, rsa_bias
from .folded import (
    MASKED,
    MAX_FOLDED_WEIGHT,
    attend_folded,
    fold_width,
    folded_key_columns,
    folded_query_table,
)
from .ops import attend, rba, rsa
from .processors import (
    DenseBiasProcessor,
    FoldedBiasProcessor,
    MaskedReferenceProcessor,
    RecordingAttnProcessor,
    ReferenceAttnProcessor,
    installed_processors,
)
from .state import BatchLayout, BiasSteering, MapRecorder, MaskSteering, ReferenceKV

__all__ = [
    "attend", "rsa", "rba", "reference_bias", "rsa_bias", "rba_bias", "rba_table",
    "masks_for_grid", "MASKED", "MAX_FOLDED_WEIGHT", "fold_width", "folded_key_columns",
    "folded_query_table", "attend_folded", "BatchLayout", "MapRecorder", "ReferenceKV",
    "MaskSteering", "BiasSteering", "RecordingAttnProcessor", "ReferenceAttnProcessor",
    "MaskedReferenceProcessor", "DenseBiasProcessor", "FoldedBiasProcessor",
    "installed_processors",
]
