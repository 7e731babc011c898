"""Official benchmark prompt files at pinned commits, fetched once and checked by sha256.

- geneval: djghosh13/geneval at af4902f: prompts/evaluation_metadata.jsonl (553 prompts) and
           object_names.txt -> <dest>/geneval/
- dpg:     TencentQQGYLab/ELLA at 3c228f1: dpg_bench/prompts/*.txt (1,065 prompts) -> <dest>/dpg/prompts/;
           dpg_bench.csv (the questions) is taken from the same archive when it holds the real file, and its
           sha256 recorded in <dest>/dpg/SOURCE.json, unpinned: no reference copy of it was available.
- hpsv3:   the HPSv3 scorer's instruction text (the model's input rubric, 2,523 characters) from the
           official PyPI wheel hpsv3 1.0.0 (sha256-pinned), read with `ast` from
           hpsv3/dataset/data_collator_qwen.py (nothing of it is run) -> <dest>/hpsv3/instruction.json; checked by
           the sha256 of the text it builds for "a photo of a cat".
- unipercept: the UniPercept scorer's question template and default system message, likewise from the official
           PyPI wheel unipercept-reward 1.0.3 (ast, nothing run) -> <dest>/unipercept/prompts.json; checked by
           the sha256 of its three questions.
A folder of files is checked by one digest: sha256 over "<name>\\0<sha256 of file>\\n" in name order.

<dest> defaults to $HARNESS_DATA or ./data, where the suites look (evaluators/suites.py).
Offline (or HARNESS_OFFLINE=1) a download fails with a message saying how to copy a local copy instead.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from harness.io import atomic_write_bytes, atomic_write_json

GENEVAL_COMMIT = "af4902f"
GENEVAL_FILES = {   # repo path -> (file name under <dest>/geneval, sha256)
    "prompts/evaluation_metadata.jsonl": ("evaluation_metadata.jsonl",
                                          "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"),
    "prompts/object_names.txt": ("object_names.txt",
                                 "608f6a0e5c8ca1c7a92b818430141fe268c85b7930b50f4160f1d65893b5bacd"),
}
GENEVAL_URL = "https://raw.githubusercontent.com/djghosh13/geneval/{commit}/{path}"

DPG_COMMIT = "3c228f1"
DPG_ARCHIVE_URL = "https://codeload.github.com/TencentQQGYLab/ELLA/tar.gz/{commit}"
DPG_PROMPT_COUNT = 1065
DPG_PROMPTS_DIGEST = "c9c75784dc4dbc8442fd749fdae3b425f55e659a6277fa090611d47912d48fb5"

HPSV3_WHEEL_URL = ("https://files.pythonhosted.org/packages/20/ed/6feb979b0086f57dc7a8b545693e1dbeffd60c8d942971e0445c65fcf438/"
                   "hpsv3-1.0.0-py3-none-any.whl")
HPSV3_WHEEL_SHA256 = "1a1b3ed1f538315ddf0e90c55b9f5c8ab3248d772cd713c11f7dfe35bf867ab3"
HPSV3_SOURCE_FILE = "hpsv3/dataset/data_collator_qwen.py"
HPSV3_CHECK_PROMPT = "a photo of a cat"        # instruction.format(text_prompt=...) + suffix: 2,593 characters
HPSV3_CHECK_SHA256 = "ed13a1b1b6f42463518c1f55de40a864b97876aa12e6e2f367f0a0e44aa4196e"

UNIPERCEPT_WHEEL_URL = ("https://files.pythonhosted.org/packages/4d/93/052b8476955f9579c3e1d1c7ac89fb15e6ff96cd84ceb2ec559ab97a203c/"
                        "unipercept_reward-1.0.3-py3-none-any.whl")
UNIPERCEPT_WHEEL_SHA256 = "6a77a47f89c76426454b5eac096dc8926e984d3a9421cf7a8f0d1a85d9c728cc"
UNIPERCEPT_MODEL_FILE = "unipercept_reward/internvl/model/internvl_chat/modeling_unipercept.py"
UNIPERCEPT_CONVERSATION_FILE = "unipercept_reward/internvl/conversation.py"
UNIPERCEPT_QUESTION_SHA256 = {   # the question for each dimension's description
    "aesthetics": "9879f2c55a8b70f306b090acfba40c215c3b252ec5f9941fbee98716a1df87a1",
    "quality": "f36f2a79a2e7dd0fb6655515f06be6d1052f9ef3c18e1336c718ca2be0ea6ef9",
    "structure and texture richness": "0fd7be812d1d510fad482a0e9c2d6a0935ad6720b6c2ebf7d5320fcca2d452b8",
}

DATASETS = ("geneval", "dpg", "hpsv3", "unipercept")


class FetchError(OSError):
    """A download failed or a file does not match its pinned hash."""


def default_dest() -> Path:
    return Path(os.environ.get("HARNESS_DATA") or "data")


def folder_digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).hexdigest().encode() + b"\n")
    return h.hexdigest()


def _download(url: str, timeout: float = 60) -> bytes:
    hint = ("fetch on a machine with network access, or copy a local copy with --prompts PATH "
            "(e.g. ../shared/reference/geneval or ../shared/reference/dpg/prompts)")
    if os.environ.get("HARNESS_OFFLINE") == "1":
        raise FetchError(f"cannot download {url}: HARNESS_OFFLINE=1; {hint}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise FetchError(f"cannot download {url} ({reason}); this machine looks offline: {hint}") from None


def _check_sha(name: str, data: bytes, expected: str, source: str) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise FetchError(f"{name} from {source} has sha256 {got}, expected {expected} (the official file at the "
                         f"pinned commit); it is another version or was altered, so it was not installed")


def fetch_geneval(dest: str | os.PathLike | None = None, prompts: str | os.PathLike | None = None) -> list[Path]:
    """Install the GenEval prompt files under <dest>/geneval/. `prompts`: a local evaluation_metadata.jsonl
    or a folder holding it (object_names.txt is copied too when it is beside it)."""
    out_dir = Path(dest or default_dest()) / "geneval"
    written = []
    for repo_path, (name, sha) in GENEVAL_FILES.items():
        if prompts is None:
            url = GENEVAL_URL.format(commit=GENEVAL_COMMIT, path=repo_path)
            data, source = _download(url), url
        else:
            local = Path(prompts)
            folder = local if local.is_dir() else local.parent
            path = local if (local.is_file() and name == "evaluation_metadata.jsonl") else folder / name
            if not path.is_file():
                if name == "evaluation_metadata.jsonl":
                    raise FileNotFoundError(f"--prompts {local}: no evaluation_metadata.jsonl there")
                continue   # object_names.txt is optional in a local copy
            data, source = path.read_bytes(), str(path)
        _check_sha(name, data, sha, source)
        written.append(atomic_write_bytes(out_dir / name, data))
    atomic_write_json(out_dir / "SOURCE.json", {"repo": "djghosh13/geneval", "commit": GENEVAL_COMMIT,
                                                "files": {n: s for n, s in GENEVAL_FILES.values()}})
    return written


def _install_folder(files: dict[str, bytes], target: Path) -> None:
    """Write a whole folder, then swap it in, so a failure never leaves half a prompt set."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def fetch_dpg(dest: str | os.PathLike | None = None, prompts: str | os.PathLike | None = None) -> list[Path]:
    """Install the DPG-Bench prompts under <dest>/dpg/prompts/. `prompts`: a local copy of that folder."""
    out_dir = Path(dest or default_dest()) / "dpg"
    csv_data = None
    if prompts is None:
        url = DPG_ARCHIVE_URL.format(commit=DPG_COMMIT)
        source = url
        files = {}
        with tarfile.open(fileobj=io.BytesIO(_download(url, timeout=300)), mode="r:gz") as archive:
            for member in archive.getmembers():
                parts = member.name.split("/")
                if not member.isfile() or len(parts) < 3 or parts[1] != "dpg_bench":
                    continue
                if parts[2] == "prompts" and len(parts) == 4 and parts[3].endswith(".txt"):
                    files[parts[3]] = archive.extractfile(member).read()
                elif parts[2:] == ["dpg_bench.csv"]:
                    csv_data = archive.extractfile(member).read()
    else:
        folder = Path(prompts)
        if not folder.is_dir():
            raise FileNotFoundError(f"--prompts {folder}: expected the dpg_bench/prompts folder (<prompt_id>.txt files)")
        source = str(folder)
        files = {f.name: f.read_bytes() for f in folder.glob("*.txt")}
    if len(files) != DPG_PROMPT_COUNT or folder_digest(files) != DPG_PROMPTS_DIGEST:
        raise FetchError(f"DPG prompts from {source}: {len(files)} files with digest {folder_digest(files)}, expected "
                         f"{DPG_PROMPT_COUNT} files with digest {DPG_PROMPTS_DIGEST} (ELLA at {DPG_COMMIT}); not installed")
    _install_folder(files, out_dir / "prompts")
    written = [out_dir / "prompts"]
    manifest = {"repo": "TencentQQGYLab/ELLA", "commit": DPG_COMMIT, "prompts_digest": DPG_PROMPTS_DIGEST}
    if csv_data is not None and not csv_data.startswith(b"version https://git-lfs"):
        written.append(atomic_write_bytes(out_dir / "dpg_bench.csv", csv_data))
        manifest["dpg_bench_csv_sha256_unpinned"] = hashlib.sha256(csv_data).hexdigest()
    atomic_write_json(out_dir / "SOURCE.json", manifest)
    return written


def hpsv3_instruction_from_source(source: str) -> dict[str, str]:
    """{"instruction", "suffix"}: the module's INSTRUCTION and prompt_with_special_token string constants."""
    import ast
    names = {"INSTRUCTION": "instruction", "prompt_with_special_token": "suffix"}
    found = {}
    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in names and isinstance(node.value, ast.Constant)):
            found[names[node.targets[0].id]] = node.value.value
    missing = sorted(set(names.values()) - set(found))
    if missing:
        raise FetchError(f"{HPSV3_SOURCE_FILE} has no string constant for {', '.join(missing)}")
    return found


def fetch_hpsv3(dest: str | os.PathLike | None = None, prompts: str | os.PathLike | None = None) -> list[Path]:
    """Install the HPSv3 instruction under <dest>/hpsv3/. `prompts`: a local copy of the hpsv3 1.0.0 wheel."""
    import zipfile
    source = str(prompts) if prompts is not None else HPSV3_WHEEL_URL
    wheel = Path(prompts).read_bytes() if prompts is not None else _download(HPSV3_WHEEL_URL)
    _check_sha("hpsv3-1.0.0-py3-none-any.whl", wheel, HPSV3_WHEEL_SHA256, source)
    with zipfile.ZipFile(io.BytesIO(wheel)) as archive:
        texts = hpsv3_instruction_from_source(archive.read(HPSV3_SOURCE_FILE).decode("utf-8"))
    built = texts["instruction"].format(text_prompt=HPSV3_CHECK_PROMPT) + texts["suffix"]
    _check_sha("the HPSv3 instruction", built.encode(), HPSV3_CHECK_SHA256, source)
    out_dir = Path(dest or default_dest()) / "hpsv3"
    written = [atomic_write_json(out_dir / "instruction.json", texts)]
    atomic_write_json(out_dir / "SOURCE.json", {"wheel": HPSV3_WHEEL_URL, "wheel_sha256": HPSV3_WHEEL_SHA256,
                                                "file": HPSV3_SOURCE_FILE, "check_sha256": HPSV3_CHECK_SHA256})
    return written


def unipercept_prompts_from_source(model_source: str, conversation_source: str) -> dict[str, str]:
    """{"question": template with {desc}, "system_message"}: the f-string assigned to `question` in `score`, and
    the system_message of the conversation template named internvl2_5."""
    import ast
    question = system = None
    for node in ast.walk(ast.parse(model_source)):
        if isinstance(node, ast.FunctionDef) and node.name == "score":
            for st in ast.walk(node):
                if (isinstance(st, ast.Assign) and isinstance(st.targets[0], ast.Name) and st.targets[0].id == "question"
                        and isinstance(st.value, ast.JoinedStr)):
                    parts = [v.value.replace("{", "{{").replace("}", "}}") if isinstance(v, ast.Constant)
                             else "{" + ast.unparse(v.value) + "}" for v in st.value.values]
                    question = "".join(parts)
    for node in ast.walk(ast.parse(conversation_source)):
        if isinstance(node, ast.Call):
            kw = {k.arg: k.value for k in node.keywords}
            if getattr(kw.get("name"), "value", None) == "internvl2_5" and isinstance(kw.get("system_message"), ast.Constant):
                system = kw["system_message"].value
    if question is None or "{desc}" not in question or system is None:
        raise FetchError("the UniPercept wheel does not hold the expected question f-string / internvl2_5 template")
    return {"question": question, "system_message": system}


def fetch_unipercept(dest: str | os.PathLike | None = None, prompts: str | os.PathLike | None = None) -> list[Path]:
    """Install the UniPercept prompts under <dest>/unipercept/. `prompts`: a local copy of the 1.0.3 wheel."""
    import zipfile
    source = str(prompts) if prompts is not None else UNIPERCEPT_WHEEL_URL
    wheel = Path(prompts).read_bytes() if prompts is not None else _download(UNIPERCEPT_WHEEL_URL)
    _check_sha("unipercept_reward-1.0.3-py3-none-any.whl", wheel, UNIPERCEPT_WHEEL_SHA256, source)
    with zipfile.ZipFile(io.BytesIO(wheel)) as archive:
        texts = unipercept_prompts_from_source(archive.read(UNIPERCEPT_MODEL_FILE).decode("utf-8"),
                                               archive.read(UNIPERCEPT_CONVERSATION_FILE).decode("utf-8"))
    for desc, sha in UNIPERCEPT_QUESTION_SHA256.items():
        _check_sha(f"the UniPercept question for {desc!r}", texts["question"].format(desc=desc).encode(), sha, source)
    out_dir = Path(dest or default_dest()) / "unipercept"
    written = [atomic_write_json(out_dir / "prompts.json", texts)]
    atomic_write_json(out_dir / "SOURCE.json", {"wheel": UNIPERCEPT_WHEEL_URL, "wheel_sha256": UNIPERCEPT_WHEEL_SHA256,
                                                "question_sha256": UNIPERCEPT_QUESTION_SHA256})
    return written


def fetch(which: str, dest: str | os.PathLike | None = None, prompts: str | os.PathLike | None = None) -> list[Path]:
    if which not in DATASETS:
        import difflib
        close = difflib.get_close_matches(which, DATASETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown dataset {which!r}.{hint} Known: {', '.join(DATASETS)}")
    return {"geneval": fetch_geneval, "dpg": fetch_dpg, "hpsv3": fetch_hpsv3,
            "unipercept": fetch_unipercept}[which](dest, prompts)

