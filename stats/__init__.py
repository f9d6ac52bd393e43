"""Host-free DPM-Solver-v3 empirical model statistics (EMS): estimation, files and cache."""
from .ems import EMS, import_official_ems, load_ems
from .estimate import EstimationState, estimate_ems, generate_x0
from .cache import EMSCache, fingerprint_state_dict, sigma_digest

__all__ = ["EMS", "load_ems", "import_official_ems", "estimate_ems", "generate_x0", "EstimationState", "EMSCache",
           "fingerprint_state_dict", "sigma_digest"]
