"""The generator's density by change of variables, and the EBM's own density on a 2-D grid.

* ``estimators``: traces and log-determinants of the energy's Hessian (exact, Hutchinson);
* ``rules``: per-sampler change-of-variables rules, looked up by the sampler's type (``RULES``);
* ``generator``: ``log q`` forward along the sampler's own dynamics and by inverting them;
* ``grid``: 2-D grids, ``log Z`` by quadrature, KL / TV on a grid, histograms, KDE;
* ``ebm``: ``log Z`` in any dimension by annealed importance sampling (``estimate_log_partition``).
"""

from .ebm import AISResult, BitsPerDim, ais_schedule, estimate_log_partition, log_mean_exp_stats
from .estimators import (
    EXACT_TRACE_MAX_DIM,
    TRACE_METHODS,
    Estimator,
    hessian,
    laplacian,
    logdet_descent_step,
    rademacher,
    resolve_trace,
)
from .generator import bits_per_dim, check_density, log_prob, sample_with_log_prob
from .grid import (
    ebm_log_density,
    grid_2d,
    histogram_2d,
    histogram_lookup,
    kde_log_density,
    kl_on_grid,
    log_partition_on_grid,
    normalise_on_grid,
    tv_on_grid,
)
from .rules import RULES, FlowRule, StepRule, invert_descent_step, rule_for

__all__ = [
    "TRACE_METHODS",
    "EXACT_TRACE_MAX_DIM",
    "resolve_trace",
    "rademacher",
    "hessian",
    "laplacian",
    "logdet_descent_step",
    "check_density",
    "sample_with_log_prob",
    "log_prob",
    "invert_descent_step",
    "bits_per_dim",
    "grid_2d",
    "normalise_on_grid",
    "ebm_log_density",
    "kl_on_grid",
    "tv_on_grid",
    "histogram_2d",
    "histogram_lookup",
    "kde_log_density",
    "Estimator",
    "StepRule",
    "FlowRule",
    "RULES",
    "rule_for",
    "log_partition_on_grid",
    "estimate_log_partition",
    "ais_schedule",
    "log_mean_exp_stats",
    "AISResult",
    "BitsPerDim",
]
