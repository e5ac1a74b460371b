"""修复文本的构建：附带的 Gutenberg 全书清理成正文段落，且与内置评估文本按来源不相交。"""

import gzip
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_builder():
    spec = importlib.util.spec_from_file_location("build_heal_data", ROOT / "scripts" / "data" / "build_heal_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_book_becomes_clean_prose_paragraphs():
    builder = load_builder()
    raw = gzip.decompress(builder.OUTLINE.read_bytes()).decode("utf-8")
    paragraphs = builder.gutenberg_prose(raw, "THE ROMANCE OF THE HEAVENS")
    text = "\n".join(paragraphs)
    assert len(text) > 400_000  # all eight chapters, not only the calibration excerpt
    for leftover in ("[Illustration", "Project Gutenberg", "BIBLIOGRAPHY", "_", "§", "[1]", "Knickerbocker"):
        assert leftover not in text, leftover
    assert all("\n" not in p and len(p) >= 60 for p in paragraphs)
    assert paragraphs[0].startswith("The story of the triumphs of modern science")
    # the chapter bibliographies are dropped, the chapter after each one is kept
    assert not any(p.startswith("BALL, The Story of the Heavens") for p in paragraphs)
    assert any("radium" in p for p in paragraphs)


def test_the_heal_text_shares_no_paragraph_with_the_evaluation_set():
    builder = load_builder()
    raw = gzip.decompress(builder.OUTLINE.read_bytes()).decode("utf-8")
    paragraphs = set(builder.gutenberg_prose(raw, "THE ROMANCE OF THE HEAVENS"))
    evaluation = (ROOT / "patcher" / "data" / "evaluation" / "encyclopedic.txt").read_text().splitlines()
    assert not paragraphs & {line for line in evaluation if len(line) >= 60}
