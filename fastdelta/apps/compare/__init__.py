"""The paper's comparison on the user's data: runs (comparison), report, figures and their analysis."""
from .comparison import CompareSettings, compare  # noqa: F401
