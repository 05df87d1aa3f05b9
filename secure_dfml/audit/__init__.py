"""Leakage audits: membership-inference attacks, metrics, empirical epsilon, threat models.

Typical use (engine-independent)::

    from secure_dfml import audit
    res = audit.audit_model(
        model, x_members=xm, y_members=ym, x_nonmembers=xn, y_nonmembers=yn,
        pool_x=px, pool_y=py, model_factory=make_model, train_fn=train,
        attacks=("loss", "lira_online", "rmia_online"), n_reference=4,
        rng=np.random.default_rng(0),
    )
    res.results["rmia_online"].metrics.auc   # Estimate(value, ci_low, ci_high)

Attacks are pure functions over arrays (see :data:`ATTACKS`); signals are
computed once per (model, samples) by :func:`compute_signals`.

Engine integration::

    audit.audit_run_dir("runs/x", threat_model="curious-aggregator", rng=np.random.default_rng(0))
    # -> runs/x/audit/curious-aggregator/{results.json, report.html}

The canary math lives here too (:func:`draw_canaries`, :func:`canary_peer_entry`);
the driver that trains a federation with canaries sits above, in
:func:`secure_dfml.orchestration.canary.run_canary_audit`, as does the budget
sweep that audits each of its points (:mod:`secure_dfml.orchestration.tune`).
"""

from secure_dfml.audit._attacks import (
    ATTACKS,
    DEFAULT_RMIA_OFFLINE_A,
    AttackInputs,
    AttackOutput,
    AttackSpec,
    get_attack,
    lira_offline,
    lira_online,
    loss_attack,
    population_attack,
    rmia,
    rmia_offline,
    rmia_online,
    tune_rmia_offline_a,
)
from secure_dfml.audit._epsilon import (
    CountsBound,
    LedgerComparison,
    OneRunResult,
    clopper_pearson,
    clopper_pearson_epsilon_lower_bound,
    compare_with_ledger,
    dp_consistency_violations,
    epsilon_lower_bound_from_scores,
    one_run_attainable,
    one_run_audit,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)
from secure_dfml.audit._metrics import (
    DEFAULT_FPR_LEVELS,
    AttackMetrics,
    Estimate,
    RocCurve,
    auc,
    evaluate_attack,
    roc_curve,
    tpr_at_fpr,
    unsupported_fpr_reason,
)
from secure_dfml.audit._reference import (
    ModelFactory,
    ReferenceModels,
    TrainFn,
    membership_design,
    train_reference_models,
)
from secure_dfml.audit._runner import DEFAULT_ATTACKS, AttackResult, AuditResult, audit_model, run_attacks
from secure_dfml.audit._signals import Signals, compute_signals, stable_phi, stack_signals, true_class_log_prob
from secure_dfml.audit._training import make_trainer, reinit_parameters, torch_generator
from secure_dfml.audit._threat_models import (
    THREAT_MODEL_VIEWS,
    ThreatModel,
    list_threat_models,
    load_threat_model,
    threat_models_dir,
)
from secure_dfml.audit.report import (
    FINDING_LEVELS,
    Finding,
    finding_line,
    findings,
    render_html_report,
    render_simple_html,
    write_html_report,
)
from secure_dfml.audit._rundir import (
    ATTACK_ALIASES,
    DEFAULT_RUN_ATTACKS,
    AuditProgress,
    audit_run_dir,
    default_reference_epochs,
    rebuild_federation,
    resolve_attacks,
)
from secure_dfml.audit._eavesdropper import analyse_envelopes, byte_uniformity_p_value
from secure_dfml.audit._canary import (
    CANARY_FORMAT,
    CANARY_KINDS,
    CANARY_VERSION,
    DEFAULT_CANARY_KIND,
    CanaryDraw,
    CanaryScores,
    canary_findings,
    canary_k_grid,
    canary_peer_entry,
    check_canary_settings,
    draw_canaries,
    pooled_canary_entry,
    render_canary_html,
    render_canary_markdown,
)

__all__ = [
    "ATTACKS",
    "ATTACK_ALIASES",
    "AuditProgress",
    "DEFAULT_RUN_ATTACKS",
    "analyse_envelopes",
    "audit_run_dir",
    "byte_uniformity_p_value",
    "default_reference_epochs",
    "rebuild_federation",
    "resolve_attacks",
    "CANARY_FORMAT",
    "CANARY_VERSION",
    "CANARY_KINDS",
    "CanaryDraw",
    "CanaryScores",
    "DEFAULT_CANARY_KIND",
    "canary_findings",
    "canary_k_grid",
    "canary_peer_entry",
    "check_canary_settings",
    "draw_canaries",
    "pooled_canary_entry",
    "render_canary_html",
    "render_canary_markdown",
    "render_simple_html",
    "DEFAULT_ATTACKS",
    "DEFAULT_FPR_LEVELS",
    "DEFAULT_RMIA_OFFLINE_A",
    "FINDING_LEVELS",
    "THREAT_MODEL_VIEWS",
    "AttackInputs",
    "AttackMetrics",
    "AttackOutput",
    "AttackResult",
    "AttackSpec",
    "AuditResult",
    "CountsBound",
    "Estimate",
    "Finding",
    "LedgerComparison",
    "ModelFactory",
    "OneRunResult",
    "ReferenceModels",
    "RocCurve",
    "Signals",
    "ThreatModel",
    "TrainFn",
    "audit_model",
    "auc",
    "clopper_pearson",
    "clopper_pearson_epsilon_lower_bound",
    "compare_with_ledger",
    "compute_signals",
    "dp_consistency_violations",
    "epsilon_lower_bound_from_scores",
    "evaluate_attack",
    "finding_line",
    "findings",
    "get_attack",
    "lira_offline",
    "make_trainer",
    "reinit_parameters",
    "torch_generator",
    "lira_online",
    "list_threat_models",
    "load_threat_model",
    "loss_attack",
    "membership_design",
    "one_run_attainable",
    "one_run_audit",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "population_attack",
    "render_html_report",
    "rmia",
    "rmia_offline",
    "rmia_online",
    "roc_curve",
    "run_attacks",
    "stable_phi",
    "stack_signals",
    "threat_models_dir",
    "tpr_at_fpr",
    "train_reference_models",
    "true_class_log_prob",
    "tune_rmia_offline_a",
    "unsupported_fpr_reason",
    "write_html_report",
]
