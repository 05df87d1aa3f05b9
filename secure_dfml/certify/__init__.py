"""Certification of a run directory (DESIGN.md section 6).

* :func:`write_manifest` -- ``manifest.json``: the sha256 of every artifact, the
  package versions and a fingerprint of the code (written by every run).
* :func:`check_run` -- cross-checks of config, metrics, summary, ledgers and the
  manifest; each :class:`Finding` names the artifact and the check.
* :func:`load_requirements` -- a deployment's requirements (``audits/*.toml``).
* :func:`certify` / :func:`verify` -- a signed (Ed25519) certificate of a run
  against requirements, and its verification against the artifacts.
"""

from secure_dfml.certify._certificate import (
    AUDIT_STATEMENT,
    AUDITOR_KEY,
    AUDITOR_PUB,
    CERTIFICATE,
    CERTIFICATE_HTML,
    CertificateError,
    VerifyResult,
    UpperBounds,
    audit_binding_problem,
    audit_upper_bounds,
    canary_binding_problem,
    certify,
    failed,
    load_signing_key,
    load_verify_key,
    render_html,
    verify,
    write_auditor_key,
)
from secure_dfml.certify._checks import CHECKS, Finding, check_run, group_sizes
from secure_dfml.certify._manifest import (
    MANIFEST,
    artifact_paths,
    build_manifest,
    canonical_json,
    code_fingerprint,
    read_manifest,
    write_manifest,
)
from secure_dfml.certify._requirements import (
    AuditLimit,
    AuditRequirements,
    ExchangeRequirements,
    PeerRequirement,
    PrivacyRequirements,
    Requirements,
    RequirementsError,
    list_profiles,
    load_requirements,
    profiles_dir,
    requirements_from_dict,
    requirements_profile,
)

__all__ = [
    "AUDITOR_KEY",
    "AUDITOR_PUB",
    "AUDIT_STATEMENT",
    "CERTIFICATE",
    "CERTIFICATE_HTML",
    "CHECKS",
    "MANIFEST",
    "AuditLimit",
    "AuditRequirements",
    "CertificateError",
    "ExchangeRequirements",
    "Finding",
    "PeerRequirement",
    "PrivacyRequirements",
    "Requirements",
    "RequirementsError",
    "VerifyResult",
    "artifact_paths",
    "UpperBounds",
    "audit_binding_problem",
    "audit_upper_bounds",
    "canary_binding_problem",
    "build_manifest",
    "canonical_json",
    "certify",
    "check_run",
    "code_fingerprint",
    "failed",
    "group_sizes",
    "list_profiles",
    "load_requirements",
    "load_signing_key",
    "load_verify_key",
    "read_manifest",
    "render_html",
    "profiles_dir",
    "requirements_from_dict",
    "requirements_profile",
    "verify",
    "write_auditor_key",
    "write_manifest",
]
