"""3M SDE solver_type measurement (bench/results_flow_guidance.md): strong error of sample_dpmpp_3m_sde, official vs taylor,
guard on/off, against a 1920-step Taylor-2M SDE solution on the same exact Brownian path.

    python bench/flow_guidance_sde.py
"""
import sys, math, torch, importlib.util, pathlib
root=pathlib.Path(__file__).resolve().parents[1]
spec=importlib.util.spec_from_file_location("dpm_solver_nodes", root/"__init__.py", submodule_search_locations=[str(root)])
m=importlib.util.module_from_spec(spec); sys.modules["dpm_solver_nodes"]=m; spec.loader.exec_module(m)
import dpm_solver_nodes.samplers.sde as sde
from dpm_solver_nodes.analytic.gaussian_mixture import GaussianMixture, GuidedGaussianMixture, sample_noise
torch.set_num_threads(1)
class Path:
    def __init__(self, grid, shape, seed):
        self.index={v:j for j,v in enumerate(grid.tolist())}; self.grid=grid.tolist()
        inc=torch.randn(len(grid)-1,*shape,generator=torch.Generator().manual_seed(seed),dtype=torch.float64)*(grid[:-1]-grid[1:]).sqrt().view(-1,*[1]*len(shape))
        self.w=torch.cat([torch.zeros(1,*shape,dtype=torch.float64),inc.cumsum(0)])
    def __call__(self,s,t):
        i,j=self.index[float(s)],self.index[float(t)]
        return (self.w[j]-self.w[i])/math.sqrt(abs(self.grid[j]-self.grid[i]))
F=1920
for kind in ("eps","flow"):
  smax,smin=(14.6,0.03) if kind=="eps" else (0.999,0.03)
  if kind=="eps": grid=torch.exp(torch.linspace(math.log(smax),math.log(smin),F+1,dtype=torch.float64))
  else:
    lam=torch.linspace(math.log((1-smax)/smax),math.log((1-smin)/smin),F+1,dtype=torch.float64); grid=torch.sigmoid(-lam)
  for w in (1.0,5.0):
    res={}
    for seed in (0,1):
      mix=GaussianMixture.random(dim=16,components=8,seed=seed,spread=1.0)
      model=GuidedGaussianMixture(mix,[0,1],scale=w).denoiser(kind)
      x=sample_noise(64,(16,),seed=seed)*float(grid[0])
      path=Path(grid,(64,16),seed+10)
      ref=sde.sample_dpmpp_2m_sde(model,x,grid,model_kind=kind,noise_sampler=path,solver_type="heun",lower_order_final=False,disable=True)
      for n in (8,10,15,20,30,40):
        for st in ("official","taylor"):
          for g in (True,False):
            y=sde.sample_dpmpp_3m_sde(model,x,grid[::F//n],model_kind=kind,noise_sampler=path,solver_type=st,guard=g,disable=True)
            res.setdefault((n,st,g),[]).append((y-ref).pow(2).mean(1).median().item())
    print(kind,"w",w)
    for n in (8,10,15,20,30,40):
        print("  n=%d official %.3g taylor %.3g | no guard: official %.3g taylor %.3g"%(n,*[sum(res[(n,st,g)])/2 for g in (True,False) for st in ("official","taylor")]))
