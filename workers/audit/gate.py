"""The gate grammar lives in ``contracts.gate`` (the gateway and the client parse gate lines too);
re-exported here for code that still imports it from the workers."""

from contracts.gate import (  # noqa: F401 - re-exported
    EPS_REL_TOL,
    EXAMPLES,
    KEY_REL_TOL,
    MASKING_VALUES,
    NORMS,
    OP_CHARS,
    RATES,
    SYNTAX,
    GateError,
    GateLine,
    Measured,
    baseline_metrics,
    eps_key,
    evaluate_gate,
    evaluate_line,
    match_eps,
    metric_keys,
    parse_eps,
    parse_eps_key,
    parse_gate,
    parse_line,
)
