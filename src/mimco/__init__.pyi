# The public API's signatures for type checkers; at run time mimco/__init__.py loads mimco.api on first use.
from mimco.api import export as export
from mimco.api import extract_features as extract_features
from mimco.api import knn as knn
from mimco.api import load_backbone as load_backbone
from mimco.api import load_config as load_config
from mimco.api import probe as probe
from mimco.api import study as study
from mimco.api import train as train
from mimco.errors import MimcoError as MimcoError

__version__: str
__all__: list[str]
