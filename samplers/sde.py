"""PLACEHOLDER: being written; replaced before landing."""
def sample_dpm_solver_sde_1(*args, **kwargs):
    raise NotImplementedError("sample_dpm_solver_sde_1 is not written yet")


def sample_dpm_solver_sde_2m(*args, **kwargs):
    raise NotImplementedError("sample_dpm_solver_sde_2m is not written yet")


def sample_dpmpp_2m_sde(*args, **kwargs):
    raise NotImplementedError("sample_dpmpp_2m_sde is not written yet")


def sample_dpmpp_3m_sde(*args, **kwargs):
    raise NotImplementedError("sample_dpmpp_3m_sde is not written yet")


def sample_dpmpp_sde_1(*args, **kwargs):
    raise NotImplementedError("sample_dpmpp_sde_1 is not written yet")


