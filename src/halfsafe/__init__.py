"""halfsafe: make large-language-model generation numerically safe in float16."""

__version__ = "0.1.0"

from .diagnosing import Diagnosis, diagnose  # noqa: E402
from .errors import HalfsafeError  # noqa: E402
from .fixing.fix import FixReport, fix, load_fixed  # noqa: E402
from .guarding import GuardedGenerator, GuardReport, NonFiniteLogits, guard  # noqa: E402
from .model.loading import LoadedModel, load_model  # noqa: E402

__all__ = [
    "Diagnosis", "FixReport", "GuardReport", "GuardedGenerator", "HalfsafeError", "LoadedModel", "NonFiniteLogits",
    "diagnose", "fix", "guard", "load_fixed", "load_model", "__version__",
]
