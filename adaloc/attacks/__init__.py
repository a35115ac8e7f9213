"""What a stolen base is worth: attacks by a party holding the base and N labelled images.

- :mod:`adaloc.attacks.tuning`: the hyperparameter search shared by attacks and scratch;
- :mod:`adaloc.attacks.positions`: key position inference (shadow-model detector);
- :mod:`adaloc.attacks.weights`: fine-tune / refill attacks and the scratch reference;
- :mod:`adaloc.attacks.tokens`: token search on an M-LOCK model.

Leak = attacked accuracy - scratch accuracy (same data, same search), in points.
"""

from adaloc.attacks.positions import (
    FEATURES,
    PositionReport,
    fit_detector,
    infer_positions,
    position_report,
    select_features,
)
from adaloc.attacks.tokens import TokenSearchResult, space_bits, token_search
from adaloc.attacks.tuning import DEFAULT_GRID, SearchResult, SearchSpace, clone_fn, search
from adaloc.attacks.weights import (
    WEIGHT_ATTACKS,
    AttackerData,
    AttackResult,
    attacker_donor,
    attacker_split,
    fresh_fn,
    refill,
    scratch,
    shadow_detector,
    weight_attacks,
)

__all__ = [
    "DEFAULT_GRID",
    "FEATURES",
    "WEIGHT_ATTACKS",
    "AttackResult",
    "AttackerData",
    "PositionReport",
    "SearchResult",
    "SearchSpace",
    "TokenSearchResult",
    "attacker_donor",
    "attacker_split",
    "clone_fn",
    "fit_detector",
    "fresh_fn",
    "infer_positions",
    "position_report",
    "refill",
    "scratch",
    "search",
    "select_features",
    "shadow_detector",
    "space_bits",
    "token_search",
    "weight_attacks",
]
