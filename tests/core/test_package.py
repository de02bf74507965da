"""Packaging rules: the core stays ComfyUI-free, the pack imports outside ComfyUI, registry metadata is complete."""

import ast
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "node_helpers", "nodes",
                 "server", "execution", "latent_preview"}


def test_core_never_imports_comfyui():
    offenders = []
    for path in (ROOT / "flowgrpo_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in COMFY_MODULES]
    assert not offenders


def test_core_and_pack_import_without_comfyui():
    code = (
        "import sys, importlib.util\n"
        "import flowgrpo_core, flowgrpo_core.trainer, flowgrpo_core.rollout\n"
        f"spec = importlib.util.spec_from_file_location('flowgrpo_pack', r'{ROOT / '__init__.py'}',"
        f" submodule_search_locations=[r'{ROOT}'])\n"
        "pack = importlib.util.module_from_spec(spec); spec.loader.exec_module(pack)\n"
        "assert pack.comfy_entrypoint is None\n"
        "assert not any(m == 'comfy' or m.startswith(('comfy.', 'comfy_api')) for m in sys.modules), 'ComfyUI imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_registry_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower()
    for key in ("version", "license", "description", "dependencies"):
        assert project.get(key), key
    assert project["urls"]["Repository"]
    for key in ("PublisherId", "DisplayName", "requires-comfyui"):
        assert comfy.get(key), key
    deps = " ".join(project["dependencies"])
    assert "peft" in deps and "safetensors" in deps and "torch" in deps
    # what ComfyUI does not bring is declared alike for the registry, ComfyUI-Manager and the bootstrap
    requirements = (ROOT / "requirements.txt").read_text()
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    for name in ("peft", "open_clip_torch", "rapidocr", "onnxruntime"):
        assert name in deps and name in requirements and name in bootstrap, name
    spec = importlib.util.spec_from_file_location("core_init", ROOT / "flowgrpo_core" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__version__ == project["version"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/demo.sh" in readme
    assert "scripts/test.sh" in ci


def test_second_bootstrap_installs_nothing():
    """The bootstrap is idempotent: with everything present it neither installs nor downloads."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "bootstrap.sh")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "installing" not in out.stderr and "fetching" not in out.stderr and "creating" not in out.stderr
    assert Path(out.stdout.strip().splitlines()[-1], "main.py").is_file()
