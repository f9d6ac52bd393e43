"""Host-free DPM-Solver-v3 empirical model statistics (EMS): estimation, files and cache."""
