"""Per-client differential privacy for DFML.

* Pure math (stateless): :func:`compute_epsilon`, :func:`epsilon_for`,
  :func:`noise_for_budget` over :class:`Mechanism` histories, with Opacus' RDP
  or PRV accountant (registry :data:`ACCOUNTANTS`).
* Planning: :func:`resolve_budget` / :func:`plan_budgets` turn per-peer
  (epsilon, delta) targets and the expected participation into noise multipliers.
* :class:`PrivacyLedger`: per-peer, recorded before use, persisted atomically,
  hard budget gate, reproducible from the file alone.
* :class:`DPTrainer` (Opacus DP-SGD, Poisson sampling, per-sample clipping) and
  :func:`build_trainer`, the factory the round engine calls.
"""

from secure_dfml.privacy._accounting import (
    ACCOUNTANTS,
    AccountantSpec,
    Mechanism,
    accountant_history,
    compute_epsilon,
    epsilon_for,
    make_accountant,
    noise_for_budget,
    sample_rate_for,
    steps_per_epoch,
)
from secure_dfml.privacy._dpsgd import (
    GRAD_SAMPLE_MODES,
    DPSGDSession,
    auto_grad_sample_mode,
    clipped_sum_gradient,
    opacus_leftovers,
    reference_clipped_sum,
    resolve_grad_sample_mode,
)
from secure_dfml.privacy._errors import (
    BudgetExceededError,
    IncompatibleModelError,
    LedgerError,
    PrivacyError,
    PrivacyValidationError,
)
from secure_dfml.privacy._ledger import (
    ADJACENCY,
    LedgerEntry,
    PrivacyLedger,
    atomic_write_bytes,
    ledger_path,
    load_ledgers,
)
from secure_dfml.privacy._planner import (
    SCHEDULE_MODELS,
    Participation,
    PeerBudget,
    PeerPlan,
    default_delta,
    expected_participation,
    plan_budgets,
    resolve_budget,
    resolve_budgets,
)
from secure_dfml.privacy._trainer import RESEARCH_GRADE_LABEL, SECURE_LABEL, DPTrainer, build_trainer
from secure_dfml.privacy._validate import validate_model

__all__ = [
    "ADJACENCY",
    "ACCOUNTANTS",
    "GRAD_SAMPLE_MODES",
    "RESEARCH_GRADE_LABEL",
    "SCHEDULE_MODELS",
    "SECURE_LABEL",
    "AccountantSpec",
    "BudgetExceededError",
    "DPSGDSession",
    "DPTrainer",
    "IncompatibleModelError",
    "LedgerEntry",
    "LedgerError",
    "Mechanism",
    "Participation",
    "PeerBudget",
    "PeerPlan",
    "PrivacyError",
    "PrivacyLedger",
    "PrivacyValidationError",
    "accountant_history",
    "atomic_write_bytes",
    "auto_grad_sample_mode",
    "build_trainer",
    "clipped_sum_gradient",
    "compute_epsilon",
    "default_delta",
    "epsilon_for",
    "expected_participation",
    "ledger_path",
    "load_ledgers",
    "make_accountant",
    "noise_for_budget",
    "opacus_leftovers",
    "plan_budgets",
    "reference_clipped_sum",
    "resolve_budget",
    "resolve_budgets",
    "resolve_grad_sample_mode",
    "sample_rate_for",
    "steps_per_epoch",
    "validate_model",
]
