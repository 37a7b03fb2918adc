"""alignkit loss functions: pure functions of tensors returning ``(loss, metrics)`` (see docs/LOSSES.md).

    sft          masked NLL, DFT, label smoothing                         (unit: token)
    preference   dpo_loss (15 types, f-divergences, MPO, WPO, LD-DPO), simpo_loss, cpo_loss, orpo_loss  (pair)
    unpaired     kto_loss, bco_loss                                      (example)
    reward       bradley_terry_loss / reward_loss, prm_loss, aggregate_step_scores
    advantages   grpo / rloo / reinforce++ advantages                    (no grad)
    policy       kl_estimate, ratios, policy_loss, pg_loss, rollout_is_weights, masks
    aggregation  aggregate(L, m, mode=..., normalizer=...)                (token -> scalar)
    distill      generalized_jsd_loss (forward/reverse KL, JSD_β), sparse_divergence_loss (top-k + tail),
                 chunked_generalized_jsd_loss (from hidden states and heads)  (token or sequence)

Every loss takes a required ``normalizer`` keyword; registries map names to functions (``DPO_LOSSES``,
``POLICY_LOSSES``, ``ADVANTAGES``, ``AGGREGATIONS``, ``KL_ESTIMATORS``, ...).
"""

from alignkit.losses.advantages import (
    ADVANTAGES,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from alignkit.losses.aggregation import AGGREGATIONS, aggregate
from alignkit.losses.distill import (
    chunked_generalized_jsd_loss,
    chunked_token_divergence,
    forward_kl_loss,
    generalized_jsd_loss,
    reverse_kl_loss,
    sparse_divergence_loss,
)
from alignkit.losses.policy import (
    KL_ESTIMATORS,
    POLICY_LOSSES,
    kl_estimate,
    kl_penalized_rewards,
    pg_loss,
    policy_loss,
    policy_token_loss,
    rollout_is_weights,
)
from alignkit.losses.preference import (
    CPO_LOSSES,
    DPO_LOSSES,
    F_DIVERGENCES,
    cpo_loss,
    dpo_loss,
    orpo_loss,
    simpo_loss,
)
from alignkit.losses.reward import aggregate_step_scores, bradley_terry_loss, prm_loss
from alignkit.losses.sft import SFT_KINDS, sft_loss
from alignkit.losses.unpaired import BCOState, bco_loss, kto_loss

reward_loss = bradley_terry_loss

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "BCOState",
    "CPO_LOSSES",
    "DPO_LOSSES",
    "F_DIVERGENCES",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "SFT_KINDS",
    "aggregate",
    "aggregate_step_scores",
    "bco_loss",
    "bradley_terry_loss",
    "chunked_generalized_jsd_loss",
    "chunked_token_divergence",
    "cpo_loss",
    "dpo_loss",
    "forward_kl_loss",
    "generalized_jsd_loss",
    "grpo_advantages",
    "kl_estimate",
    "kl_penalized_rewards",
    "kto_loss",
    "orpo_loss",
    "pg_loss",
    "policy_loss",
    "policy_token_loss",
    "prm_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "reverse_kl_loss",
    "reward_loss",
    "rloo_advantages",
    "rollout_is_weights",
    "sft_loss",
    "simpo_loss",
    "sparse_divergence_loss",
]
