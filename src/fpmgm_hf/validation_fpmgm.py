"""Validation shared by the Hub-side files: config checks (every failure is a `ValueError` naming the config
class, the field, the value and what is allowed; NaN never passes a numeric check), and the all-or-nothing
save / load of model folders behind `CheckedWeightsMixin`:

- `save_pretrained` writes into a temporary sibling folder, adds `checksums.json` (sha256 and size of every
  file it wrote) and swaps the folder into place, so a killed save leaves the old folder or the new one, never
  a mix; files of the old folder that the save does not own (tokenizer, README, subfolders) are kept.
- `from_pretrained` refuses, with an error naming the file, tensor or shape: a missing or unparsable
  `config.json` / `generation_config.json`, a file whose bytes differ from `checksums.json` (bit flips,
  appended or cut bytes), a truncated weight file, and missing, unexpected or shape-mismatched tensors.
  A folder without `checksums.json` (saved by an older version) loads with a warning.

`python -m fpmgm_hf.validation_fpmgm verify|update FOLDER` checks a folder against its manifest or rewrites
the manifest after a deliberate edit.

Hub-portable: imports only the standard library and (lazily) transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import struct
import sys
import tempfile
import uuid
import zipfile

logger = logging.getLogger(__name__)


def fail(owner: str, field: str, value, allowed) -> None:
    raise ValueError(f"{owner}: `{field}`={value!r} is invalid; allowed: {allowed}.")


def check_int(owner: str, field: str, value, low: int, high=None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        fail(owner, field, value, f"an integer >= {low}" + (f" and <= {high}" if high is not None else ""))


def check_float(owner: str, field: str, value, low: float, high: float, low_open=False, high_open=False) -> None:
    """`value` is a real number in the interval from `low` to `high` (open ends as flagged)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        fail(owner, field, value, f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def check_range(owner: str, field: str, value, low: int) -> tuple[int, int]:
    """A pair (lo, hi) of integers with low <= lo <= hi; returned as a tuple (JSON gives lists)."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
        or value[0] < low
        or value[0] > value[1]
    ):
        fail(owner, field, value, f"a pair (lo, hi) of integers with {low} <= lo <= hi")
    return (int(value[0]), int(value[1]))


def weight_file_problems(folder: str) -> list[str]:
    """Truncated or corrupt weight files in `folder`, checked from their headers without loading them:
    `*.safetensors` (the 8-byte header length, the JSON header, and a size that covers every tensor) and
    torch zip archives (`*.bin`, `*.pt`, `*.pth`: the zip directory and the member CRCs). Returns one line per
    bad file; an empty list when everything is readable."""
    return [line for name in sorted(os.listdir(folder)) if (line := _file_problem(os.path.join(folder, name)))]


def _file_problem(path: str):
    """'PATH: why' for a truncated or corrupt weight file, None for a readable one or another kind of file."""
    if path.endswith(".safetensors"):
        why = _safetensors_problem(path)
    elif path.endswith((".bin", ".pt", ".pth")) and os.path.isfile(path):
        why = _zip_problem(path)
    else:
        return None
    return f"{path}: {why}" if why else None


def _safetensors_problem(path: str):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes, shorter than the 8-byte header length)"
        n = struct.unpack("<Q", head)[0]
        if 8 + n > size:
            return f"truncated (the header alone needs {8 + n} bytes, the file has {size})"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "corrupt JSON header"
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        return "corrupt JSON header (not a safetensors tensor table)"
    need = 8 + n + max(ends, default=0)
    if need > size:
        return f"truncated (the tensors need {need} bytes, the file has {size})"
    return None


def _zip_problem(path: str):
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"not a readable torch archive ({err})"
    return f"corrupt member {bad!r}" if bad else None




# --------------------------------------------------------------------------------------- the manifest

MANIFEST_NAME = "checksums.json"
# The files a model load reads; `from_pretrained` verifies these (tokenizer files, README, ... are not read).
_CONFIG_FILES = ("config.json", "generation_config.json")
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
_SHOW = 12  # names listed per problem kind before "... and N more"


class CheckpointFolderError(OSError, ValueError):
    """A model or checkpoint folder is incomplete, corrupt, or does not fit its model class. Both an `OSError`
    (what transformers raises for unreadable files) and a `ValueError` (this project's bad-input error)."""


def _loaded_by_model(name: str) -> bool:
    """config / generation config / transformers' weight files (shards and index included); not, e.g., a
    Trainer's `training_args.bin` or the converter's `cka.pt`."""
    return name in _CONFIG_FILES or _WEIGHT_FILE.fullmatch(name) is not None


def _short(items) -> str:
    items = list(items)
    more = f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def file_digest(path: str) -> dict:
    """`{"sha256": hex digest, "size": bytes}` of a file (symlinks followed, as in a Hub cache snapshot)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "size": size}


def _all_files(folder: str) -> list[str]:
    """Paths ('/'-separated, relative to `folder`) of every file below it except manifests, sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        rel = os.path.relpath(root, folder)
        out += [(n if rel == "." else f"{rel}/{n}").replace(os.sep, "/") for n in files if n != MANIFEST_NAME]
    return sorted(out)


def write_manifest(folder: str, names=None) -> dict:
    """Write `folder/checksums.json`: sha256 and size of `names` (default: every file below `folder`). Written
    to a temporary file and renamed, so a reader never sees half a manifest. Returns the file table."""
    names = _all_files(folder) if names is None else sorted(names)
    files = {name: file_digest(os.path.join(folder, name)) for name in names}
    tmp = os.path.join(folder, f".{MANIFEST_NAME}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, "algorithm": "sha256", "files": files}, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(folder, MANIFEST_NAME))
    return files


def read_manifest(path: str) -> dict:
    """The file table `{name: {"sha256", "size"}}` of a manifest; `CheckpointFolderError` if it is unreadable."""
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        valid = isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("size"), int)
            for v in files.values())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointFolderError(f"{path}: unreadable manifest ({err}); the folder cannot be verified. "
                                    "Re-save it, or delete the manifest to load it unverified.") from err
    if not valid:
        raise CheckpointFolderError(f"{path}: not a manifest (expected files: {{name: {{sha256, size}}}}).")
    return files


def manifest_problems(files: dict, resolve, names) -> list[str]:
    """'name: why' for each of `names` whose bytes differ from its manifest entry; `resolve(name)` is the
    file's local path, or None when it is absent."""
    problems = []
    for name in names:
        path, want = resolve(name), files[name]
        if path is None or not os.path.isfile(path):
            problems.append(f"{name}: missing (listed in {MANIFEST_NAME})")
            continue
        size = os.path.getsize(path)
        if size != want["size"]:  # cheap, and names the usual damage: appended or cut bytes
            problems.append(f"{name}: {size} bytes, {want['size']} when saved (replaced, or bytes appended or cut)")
        elif (got := file_digest(path)["sha256"]) != want["sha256"]:
            problems.append(f"{name}: content changed since the save (sha256 {got[:12]}..., saved "
                            f"{want['sha256'][:12]}...): bit flips or an edit")
    return problems


def verify_folder(folder: str) -> list[str]:
    """Every problem of `folder` against its manifest (every listed file, and model files it does not list);
    `[]` when all is well. Raises `CheckpointFolderError` when there is no readable manifest."""
    manifest = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(manifest):
        raise CheckpointFolderError(f"{folder}: no {MANIFEST_NAME}; the folder cannot be verified.")
    files = read_manifest(manifest)
    problems = manifest_problems(files, lambda n: os.path.join(folder, n), sorted(files))
    return problems + _unlisted(folder, files)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "tokenizer.model", "chat_template.jinja")


def check_tokenizer_files(folder: str) -> None:
    """The tokenizer files of a folder that its manifest lists must be as saved (a tokenizer saved into the folder
    after the model, hence unlisted, passes). Raises `CheckpointFolderError` naming the files."""
    manifest = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(manifest):
        return
    files = read_manifest(manifest)
    names = [n for n in TOKENIZER_FILES if n in files]
    problems = manifest_problems(files, lambda n: os.path.join(folder, n), names)
    if problems:
        raise _manifest_failure(folder, problems)


def _unlisted(folder: str, files: dict) -> list[str]:
    return [f"{n}: not listed in {MANIFEST_NAME} (added after the save?)"
            for n in sorted(os.listdir(folder)) if _loaded_by_model(n) and n not in files]


def _manifest_failure(where: str, problems: list[str]) -> CheckpointFolderError:
    return CheckpointFolderError(
        f"{where}: files differ from the {MANIFEST_NAME} written when it was saved:\n  " + "\n  ".join(problems)
        + "\nThe copy or download is corrupt (download it again, e.g. force_download=True, or re-save it). After a "
        f"deliberate edit, refresh the manifest: python -m fpmgm_hf.validation_fpmgm update {where}")


# -------------------------------------------------------------------------------------- atomic saves


def _owned_by_save(name: str) -> bool:
    """Entries a model save writes (or must drop, like the shards of an earlier save)."""
    return _loaded_by_model(name) or name == MANIFEST_NAME


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)  # no bytes copied; the old folder is deleted right after the swap
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: str, new: str) -> None:
    """Bring the entries of `old` that the save did not write and does not own (tokenizer files, README.md,
    subfolders such as `vq/`) into `new`, so a save into a used folder drops nothing but the old model."""
    for name in os.listdir(old):
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if _owned_by_save(name) or os.path.lexists(dst):
            continue
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_into_place(new: str, target: str) -> None:
    if not os.path.lexists(target):
        os.replace(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old folder
    else:  # two renames: a kill between them leaves both complete folders as hidden siblings, never a mix
        parent, name = os.path.split(target)
        old = os.path.join(parent, f".{name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: the process exists, owned by someone else
        return True
    return True


def _remove_dead_leftovers(parent: str, name: str) -> None:
    """Clean up after a save that was killed (its PID no longer runs): a `.NAME.old-PID-*` sibling is the
    complete old folder, put back if the kill came between the two renames; other leftovers are deleted. A save
    still in progress in another process keeps its folders."""
    dead = []
    for entry in sorted(os.listdir(parent)):
        for kind in ("old", "tmp"):
            prefix = f".{name}.{kind}-"
            pid = entry[len(prefix):].split("-", 1)[0] if entry.startswith(prefix) else ""
            if pid.isdigit() and not _pid_alive(int(pid)):
                dead.append((kind, os.path.join(parent, entry)))
    target = os.path.join(parent, name)
    for kind, path in sorted(dead):  # "old" sorts first
        if kind == "old" and not os.path.lexists(target):
            os.replace(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)


def replace_folder_atomically(target, fill, carry_over: bool = True) -> None:
    """Run `fill(tmp)` on a new temporary sibling folder of `target`, then swap it into place: a kill at any
    moment leaves the old folder or the new one, never a mix. With `carry_over`, entries of an existing `target`
    that `fill` did not write and that are not model files are carried over (as hard links); without it the new
    folder is exactly what `fill` wrote (a tool that owns the whole folder)."""
    target = os.path.realpath(os.fspath(target))
    if os.path.exists(target) and not os.path.isdir(target):
        raise CheckpointFolderError(f"{target} is a file; a model is saved into a folder.")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    _remove_dead_leftovers(parent, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent)
    try:
        os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode) if os.path.isdir(target) else 0o755)
        fill(tmp)
        if carry_over and os.path.isdir(target):
            _carry_over(target, tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -------------------------------------------------------------------------------- all-or-nothing loads


def _resolver(name_or_path, kwargs):
    """(`resolve(filename) -> local path or None`, local folder or None) for a folder or a Hub repo id."""
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(os.fspath(name_or_path)):
        folder = os.path.join(os.fspath(name_or_path), subfolder) if subfolder else os.fspath(name_or_path)
        return (lambda n: p if os.path.isfile(p := os.path.join(folder, n)) else None), folder
    from transformers.utils import cached_file  # the Hub cache: snapshot files are symlinks into blobs/

    opts = {k: kwargs[k] for k in ("cache_dir", "force_download", "proxies", "local_files_only", "token",
                                   "revision", "subfolder") if kwargs.get(k) is not None}
    return (lambda n: cached_file(name_or_path, n, _raise_exceptions_for_missing_entries=False, **opts)), None


def _json_problem(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"not valid JSON ({err})"
    return None if isinstance(value, dict) else f"not a JSON object (got {type(value).__name__})"


def check_model_files(owner: str, name_or_path, kwargs: dict) -> None:
    """Before `from_pretrained` reads anything: `config.json` present (unless a config is passed), weight files
    complete, files equal to the manifest, config files parsable. Raises `CheckpointFolderError`."""
    resolve, folder = _resolver(name_or_path, kwargs)
    where = folder or f"{name_or_path}" + (f"/{kwargs['subfolder']}" if kwargs.get("subfolder") else "")
    if kwargs.get("config") is None and resolve("config.json") is None:
        raise CheckpointFolderError(f"{owner}.from_pretrained: {where!r} has no config.json, so the weights cannot "
                                    "be matched to an architecture; copy the model's config.json next to them.")
    manifest = resolve(MANIFEST_NAME)
    files = read_manifest(manifest) if manifest is not None else None
    # Truncation first: its message ("truncated, the tensors need N bytes") says more than a size difference.
    names = [n for n in (os.listdir(folder) if folder is not None else files or ()) if _loaded_by_model(n)]
    bad = [line for n in sorted(names) if (path := resolve(n)) and (line := _file_problem(path))]
    if bad:
        raise CheckpointFolderError(f"{owner}.from_pretrained: truncated or corrupt weights in {where!r}:\n  "
                                    + "\n  ".join(bad) + "\nRe-save the model or download it again "
                                    "(force_download=True).")
    if files is None:
        logger.warning("%s: no %s (saved by an older version?); loading it without a corruption check.",
                       where, MANIFEST_NAME)
    else:
        skip = "config.json" if kwargs.get("config") is not None else None  # a passed config replaces it
        names = [n for n in sorted(files) if _loaded_by_model(n) and n != skip]
        problems = manifest_problems(files, resolve, names)
        problems += _unlisted(folder, files) if folder is not None else []
        if problems:
            raise _manifest_failure(where, problems)
    for name in _CONFIG_FILES:
        if (path := resolve(name)) is not None and (why := _json_problem(path)):
            raise CheckpointFolderError(f"{owner}.from_pretrained: {path}: {why}.")


def _name_the_file(owner: str, name_or_path, kwargs: dict, err: ValueError) -> ValueError:
    """A config check failed inside `from_pretrained` ("`field`=value is invalid"): name the file holding the
    field (config.json or generation_config.json); other errors are returned unchanged."""
    field = re.search(r"`(\w+)`", str(err))
    if field is None or isinstance(err, CheckpointFolderError):
        return err
    resolve, _ = _resolver(name_or_path, kwargs)
    for name in ("generation_config.json", "config.json"):
        path = resolve(name)
        if path is not None:
            with open(path, encoding="utf-8") as f:
                if field.group(1) in json.load(f):
                    return CheckpointFolderError(f"{owner}.from_pretrained: {path}: {err}")
    return err


def loading_problems(model, info: dict, allow_mismatch: bool) -> list[str]:
    """Missing, unexpected and shape-mismatched tensors of a finished load (transformers' loading info)."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    archs = getattr(model.config, "architectures", None) or []
    if archs and type(model).__name__ not in archs and not hasattr(model, model.base_model_prefix):
        # The bare model loaded from a checkpoint with a head: the head's tensors are expected leftovers.
        children = {name for name, _ in model.named_children()}
        unexpected = [k for k in unexpected if k.split(".")[0] in children]
    mismatched = [] if allow_mismatch else [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}"
                                            for k, a, b in sorted(info.get("mismatched_keys") or ())]
    problems = [f"missing tensors ({len(missing)}; they would be left random): {_short(missing)}"] if missing else []
    problems += [f"unexpected tensors ({len(unexpected)}): {_short(unexpected)}"] if unexpected else []
    problems += [f"shape mismatches ({len(mismatched)}): {_short(mismatched)}"] if mismatched else []
    return problems + [str(e) for e in info.get("error_msgs") or ()]


def nonfinite_tensors(model) -> list[str]:
    """Names of the parameters and buffers of `model` holding NaN or inf (meta tensors are skipped)."""
    import torch

    named = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in named
            if not t.is_meta and t.is_floating_point() and not bool(torch.isfinite(t).all())]


SNAPSHOT_ATTEMPTS = 20


def _folder_identity(folder: str) -> tuple:
    """What changes when a save swaps a new folder in under this path: the directory's inode, and its manifest's."""
    manifest = os.path.join(folder, MANIFEST_NAME)
    try:
        m = os.stat(manifest)
        return os.stat(folder).st_ino, m.st_ino, m.st_mtime_ns
    except FileNotFoundError:
        return os.stat(folder).st_ino, None, None


class CheckedWeightsMixin:
    """Put before `PreTrainedModel`: all-or-nothing `save_pretrained` / `from_pretrained` (module docstring).
    `from_pretrained(..., ignore_mismatched_sizes=True)` still re-initialises mismatched tensors on request."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        if not kwargs.get("is_main_process", True):
            return super().save_pretrained(save_directory, *args, **kwargs)
        push = kwargs.pop("push_to_hub", False)
        hub = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "create_pr") if k in kwargs}
        parent_save = super().save_pretrained
        bad = nonfinite_tensors(self)
        if bad:  # an export of a diverged model would load as garbage (or be refused at load)
            raise ValueError(f"save_pretrained refused: {len(bad)} tensor(s) hold NaN or inf: "
                             f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}.")

        def fill(tmp):
            parent_save(tmp, *args, **kwargs)
            write_manifest(tmp)

        replace_folder_atomically(save_directory, fill)
        if push:  # uploads a fresh save (with its manifest) of the same model
            repo_id = hub.pop("repo_id", os.path.basename(os.path.realpath(os.fspath(save_directory))))
            self.push_to_hub(repo_id, token=kwargs.get("token"), **hub)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_nonfinite: bool = False, **kwargs):
        """As transformers', with the checks in the module docstring; weights holding NaN or inf are refused, naming
        the tensors, unless `allow_nonfinite=True` (e.g. to inspect a diverged run). A local folder replaced by a
        concurrent save while it was read (its directory is another one afterwards) is read again, so the weights,
        config and generation config always come from one save."""
        folder = os.fspath(pretrained_model_name_or_path) if pretrained_model_name_or_path is not None else None
        if folder is None or not os.path.isdir(folder):
            return cls._checked_load(pretrained_model_name_or_path, args, allow_nonfinite, kwargs)
        for _ in range(SNAPSHOT_ATTEMPTS):
            before = _folder_identity(folder)
            try:
                result = cls._checked_load(pretrained_model_name_or_path, args, allow_nonfinite, dict(kwargs))
            except (OSError, ValueError):
                if _folder_identity(folder) != before:
                    continue  # a file vanished or mixed two saves: the folder was swapped under us
                raise
            if _folder_identity(folder) == before:
                return result
        raise CheckpointFolderError(f"{folder} was replaced {SNAPSHOT_ATTEMPTS} times while being read (another "
                                    "process keeps saving into it); load it when the writer is done.")

    @classmethod
    def _checked_load(cls, pretrained_model_name_or_path, args, allow_nonfinite: bool, kwargs: dict):
        if pretrained_model_name_or_path is not None and not kwargs.get("gguf_file"):
            check_model_files(cls.__name__, pretrained_model_name_or_path, kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        allow_mismatch = kwargs.get("ignore_mismatched_sizes", False)
        kwargs["ignore_mismatched_sizes"] = True  # mismatches come back in the info, named, not as a bare error
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                  **kwargs)
        except ValueError as err:
            named = _name_the_file(cls.__name__, pretrained_model_name_or_path, kwargs, err)
            if named is err:
                raise
            raise named from err
        problems = loading_problems(model, info, allow_mismatch)
        if problems:
            sub = kwargs.get("subfolder")
            raise CheckpointFolderError(
                f"{cls.__name__}.from_pretrained({os.fspath(pretrained_model_name_or_path)!r}"
                + (f", subfolder={sub!r}" if sub else "") + ") refused: the weights do not fit the config.\n  "
                + "\n  ".join(problems) + "\nCheck that config.json belongs to these weights, or re-save the model.")
        bad = [] if allow_nonfinite else nonfinite_tensors(model)
        if bad:
            raise CheckpointFolderError(
                f"{cls.__name__}.from_pretrained({os.fspath(pretrained_model_name_or_path)!r}) refused: "
                f"{len(bad)} tensor(s) hold NaN or inf: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''} (a "
                "diverged run?). Pass allow_nonfinite=True to load them anyway.")
        return (model, info) if want_info else model


# ------------------------------------------------------------------------------------------------ CLI


def main(argv=None) -> int:
    """`verify FOLDER`: check every file against checksums.json (exit 1 on a difference); `update FOLDER`:
    rewrite checksums.json over every file, after a deliberate edit."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fpmgm_hf.validation_fpmgm", description=main.__doc__)
    parser.add_argument("action", choices=["verify", "update"])
    parser.add_argument("folder")
    args = parser.parse_args(argv)
    if args.action == "update":
        print(f"{args.folder}: {MANIFEST_NAME} lists {len(write_manifest(args.folder))} files")
        return 0
    problems = verify_folder(args.folder)
    print("\n".join(problems) if problems else f"{args.folder}: every file matches {MANIFEST_NAME}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
