"""Host-free DPM-Solver-v3 empirical model statistics (EMS): estimation, files and cache."""
from .ems import EMS, load_ems, import_official_ems
from .estimate import estimate_ems
from .cache import EMSCache, fingerprint_state_dict
