"""`promptseg bench episodes | verify-splits | make-mini | run`: helpers of the bench tools."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..testing.mini import make_mini

__all__ = ["episodes_tsv", "make_mini", "verify_splits"]


def episodes_tsv(
    dataset: str,
    fold: int | str,
    shots: int,
    *,
    seed: int = 0,
    n: int | None = None,
    splits_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    trust_pickle: bool = False,
    out: str | Path | None = None,
) -> tuple[str, int]:
    """(digest, number of episodes) of the reference stream; writes its TSV to `out`.

    Split lists: `splits_dir`, else the data root's `splits/` folder if it holds them, else the
    download cache."""
    from ..data.episodes import episode_digest, episodes, serialize_episodes
    from ..data.fewshot import DATA_ROOT_SPLITS
    from ..data.splits import SPLIT_DATASETS, find_split

    if isinstance(fold, str) and fold.isdigit():
        fold = int(fold)
    if splits_dir is None and data_root is not None and dataset in SPLIT_DATASETS:
        own = Path(data_root) / DATA_ROOT_SPLITS  # `bench make-mini` writes its lists there
        if (own / find_split(dataset, "test" if dataset == "fss1000" else fold).relpath).is_file():
            splits_dir = own
    eps = episodes(
        dataset,
        fold,
        shots,
        seed=seed,
        n=n,
        splits_dir=splits_dir,
        data_root=data_root,
        trust_pickle=trust_pickle,
    )
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(serialize_episodes(eps).encode("utf-8"))
    return episode_digest(eps), len(eps)


def verify_splits(
    splits_dir: str | Path | None = None, *, data_root: str | Path | None = None
) -> list[dict[str, Any]]:
    """Rows (file, upstream, path, expected, actual, status OK|MISMATCH|MISSING) per split file.

    Files are looked up in `splits_dir` (hsnet's layout), where the Matcher/SINE layout puts them
    under `data_root` (as `FewShotDataset` finds them), else in the download cache.
    """
    from ..data.fewshot import _MATCHER_SPLITS
    from ..data.splits import SPLIT_FILES, SPLITS_CACHE_KEY, file_sha256

    if splits_dir is not None and data_root is not None:
        raise ValueError(
            "give either splits_dir (hsnet layout) or data_root (Matcher/SINE), not both"
        )
    if splits_dir is None and data_root is None:
        from ..weights import cache_root

        splits_dir = cache_root() / SPLITS_CACHE_KEY
    rows = []
    for entry in SPLIT_FILES:
        if data_root is not None:
            rel = _MATCHER_SPLITS[entry.dataset].format(f=entry.fold)
            path = Path(data_root) / rel
        else:
            rel = entry.relpath
            path = Path(splits_dir) / rel
        actual = file_sha256(path) if path.is_file() else None
        status = "MISSING" if actual is None else "OK" if actual == entry.sha256 else "MISMATCH"
        rows.append(
            {
                "dataset": entry.dataset,
                "fold": entry.fold,
                "file": rel,
                "upstream": entry.relpath,
                "path": str(path),
                "expected": entry.sha256,
                "actual": actual,
                "status": status,
            }
        )
    return rows


def format_verify_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown-ish table: file, status, actual sha256 (first 16 hex digits)."""
    lines = ["| file | status | sha256 |", "|---|---|---|"]
    for r in rows:
        sha = (r["actual"] or "-")[:16]
        lines.append(f"| {r['file']} | {r['status']} | {sha} |")
    return "\n".join(lines)


def suite_commands(suite: str | Path, variables: dict[str, str] | None = None) -> list[list[str]]:
    """The eval invocations of a benchmarks/suites/*.yaml file as argv lists, `${VAR}` filled."""
    import shlex
    import string

    import yaml

    data = yaml.safe_load(Path(suite).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ValueError(f"{suite}: expected a mapping with a `runs:` list of commands")
    commands = []
    for line in data["runs"]:
        try:
            text = string.Template(line).substitute(variables or {})
        except KeyError as exc:
            raise ValueError(
                f"{suite}: the run `{line}` needs ${{{exc.args[0]}}}; pass --set "
                f"{exc.args[0]}=VALUE (or --data-root for DATA_ROOT)"
            ) from None
        argv = shlex.split(text)
        if argv[:1] == ["promptseg"]:
            argv = argv[1:]
        commands.append(argv)
    return commands
