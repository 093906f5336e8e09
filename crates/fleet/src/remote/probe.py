# probe.py: versions of the Python side for fleet check, one key=value per line.
import importlib, platform
print("python=" + platform.python_version())
try:
    import torch
    print("torch=" + torch.__version__)
    print("torch_cuda=" + str(torch.version.cuda))
    print("cuda_available=" + str(torch.cuda.is_available()))
    try:
        print("nccl=" + ".".join(map(str, torch.cuda.nccl.version())))
    except Exception:
        print("nccl=not available")
except ImportError:
    print("torch=not installed")
for name in ("transformers", "accelerate"):
    try:
        print(name + "=" + importlib.import_module(name).__version__)
    except ImportError:
        print(name + "=not installed")
