"""Host-free DPM-Solver-v3 empirical model statistics (EMS): settings, estimation, the EMS job, files and store."""
from .ems import EMS, import_official_ems, load_ems
from .estimate import EstimationState, estimate_ems, generate_x0
from .fingerprint import fingerprint_state_dict, sigma_digest, weights_digest
from .settings import EMSKey, EMSSettings, EMSTarget
from .store import EMSStore, EMSStoreError, validate_name
from .job import EMSJob, EMSJobInterrupted, JobResult, ModelAccess

__all__ = ["EMS", "load_ems", "import_official_ems", "estimate_ems", "generate_x0", "EstimationState",
           "EMSSettings", "EMSTarget", "EMSKey", "EMSJob", "EMSJobInterrupted", "JobResult", "ModelAccess",
           "EMSStore", "EMSStoreError", "validate_name",
           "fingerprint_state_dict", "sigma_digest", "weights_digest"]
