"""The paper's comparison on the user's data: runs (comparison), report, figures and their analysis."""
from .compare_settings import CompareSettings  # noqa: F401
from .comparison import compare  # noqa: F401
