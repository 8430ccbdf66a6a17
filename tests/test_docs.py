"""README.md and docs/: the README stays short, every generated table matches its source under docs/results, the
table renderer does what cqpolicy/tracking/tables.py says, and every relative link points to a file that exists."""
import re
from pathlib import Path

import pytest

from cqpolicy.cli import main
from cqpolicy.tracking import tables

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").split("\n")
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail into docs/"


def test_every_generated_table_matches_its_source():
    stale = tables.check(root=ROOT)
    assert not stale, "stale tables (run `cqpolicy docs`): " + "; ".join(str(b) for b in stale)


def test_the_readme_and_docs_have_generated_tables():
    found = {p.name: tables.blocks(p, ROOT) for p in tables.default_paths(ROOT)}
    assert found["README.md"], "the README's headline table is generated"
    assert sum(len(b) for b in found.values()) >= 20


# -- the renderer on a tiny CSV -----------------------------------------------------------------------------------
HEADER = ("model,steps,num_samples,method,cache_dtype,weights,family,fid_mean,fid_std,delta_fid,delta_fid_std,"
          "kid_mean,kid_std,delta_kid,delta_kid_std,macs_speedup,wall_speedup,psnr_vs_baseline,class_accuracy,"
          "model_bytes")
ROWS = [
    "m,50,10,baseline,none,fp,plain,10.0,0.5,0.0,0.0,0.5,0.02,0.0,0.0,1.0,1.0,inf,0.9,1000000",
    "m,50,10,\"fora:interval=3,warmup=0\",fp16,,fora,10.7,0.4,0.7,0.05,0.53,0.02,0.03,0.003,2.85,2.0,33.7,0.9,",
    "m,50,10,fora:interval=5,fp16,,fora,12.3,0.4,2.3,0.3,0.6,0.02,0.1,0.01,4.69,2.9,28.6,0.9,",
    "m,50,10,forecast:path=out/fc-3,fp16,int8,learned-forecast,10.25,0.46,0.25,0.04,0.51,0.02,0.012,0.002,"
    "2.85,1.67,38.4,0.9,250000",
    "m,50,10,taylorseer:interval=3,fp16,,taylorseer,10.4,0.5,0.44,0.03,0.53,0.02,0.028,0.002,2.70,1.74,38.6,0.9,",
]
V2 = {"beats": ["", "taylorseer", "", "fora,taylorseer", ""], "ties": ["", "", "", "", "fora"],
      "loses_to": ["", "learned-forecast", "", "", "learned-forecast"],
      "unopposed": ["", "", "learned-forecast,taylorseer", "", ""]}
V1 = {"not_beaten_by_margin": ["", "learned-forecast", "", "", "learned-forecast"],
      "unopposed": ["", "", "learned-forecast,taylorseer", "", "fora"]}


def tiny_csv(tmp_path, verdicts: dict, name="board.csv") -> Path:
    keys = list(verdicts)
    lines = [HEADER + "," + ",".join(keys)]
    lines += [row + "," + ",".join(f'"{verdicts[k][i]}"' for k in keys) for i, row in enumerate(ROWS)]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cells(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.split("\n")]


def test_a_leaderboard_renders_the_chosen_columns_fastest_first(tmp_path):
    tiny_csv(tmp_path, V2)
    table = cells(tables.render("board.csv", tmp_path))
    assert table[0] == ["method", "cache", "weights", "MACs speedup", "wall speedup", "FID", "ΔFID ± paired std",
                        "ΔKID ± paired std", "PSNR (dB)", "verdict"]
    assert table[1] == ["---"] * 10
    names = [r[0] for r in table[2:]]
    # fastest first, ties in CSV order; short names without default options; learned families bold
    assert names == ["`fora:interval=5`", "`fora:interval=3`", "**`forecast:path=fc-3`**", "`taylorseer:interval=3`",
                     "`plain model`"]
    forecast = table[4]
    assert forecast[1:9] == ["fp16", "int8", "2.85×", "1.67×", "10.25 ± 0.46", "+0.25 ± 0.04", "+0.012 ± 0.002",
                             "38.4"]
    assert forecast[9] == "beats fora, taylorseer"
    assert table[3][2] == "fp" and table[3][9] == "beats 1 of 2; loses to learned-forecast"
    assert table[2][9] == "unopposed"
    assert table[5][9] == "ties fora; loses to learned-forecast"
    assert table[6][8] == "∞" and table[6][9] == "–"


def test_rows_are_picked_by_names_family_macs_and_top(tmp_path):
    tiny_csv(tmp_path, V2)
    picked = cells(tables.render('board.csv names="taylorseer:interval=3;fora:interval=3" family=plain sort=given '
                                 'view=compact bold=none', tmp_path))
    assert picked[0] == ["method", "MACs speedup", "wall speedup", "ΔFID ± paired std", "ΔKID ± paired std",
                         "PSNR (dB)"]
    assert [r[0] for r in picked[2:]] == ["`taylorseer:interval=3`", "`fora:interval=3`", "`plain model`"]
    fast = cells(tables.render("board.csv family=fora,learned macs=2.8: cols=name,macs,size top=2", tmp_path))
    assert [r[0] for r in fast[2:]] == ["`fora:interval=5`", "`fora:interval=3`"]
    assert fast[3][2] == "1.00 MB"  # an unquantized row that logged no size: the plain model's
    cheap = cells(tables.render("board.csv weights=int8 cols=name,weights,size", tmp_path))
    assert cheap[2:] == [["**`forecast:path=fc-3`**", "int8", "0.25 MB"]]
    # without quantized rows, the default view has no weights column
    assert "weights" not in cells(tables.render("board.csv weights=fp", tmp_path))[0]


def test_older_csvs_show_the_v1_verdict(tmp_path):
    tiny_csv(tmp_path, V1)
    table = cells(tables.render("board.csv", tmp_path))
    assert table[0][-1] == "verdict (v1)"
    assert table[3][-1] == "does not beat learned-forecast"  # fora:interval=3
    assert table[4][-1] == "beats fora, taylorseer"  # the forecast: every other family opposed it
    assert table[2][-1] == "unopposed"


def test_bad_markers_are_one_line_errors(tmp_path):
    tiny_csv(tmp_path, V2)
    for spec, message in [("board.csv colour=red", "unknown option"), ("board.csv names=nothing", "no row named"),
                          ("board.csv cols=name,nope", "unknown column"), ("missing.csv", "not found"),
                          ("board.csv sort=speed", "sort key"), ("board.csv names='a", "cannot parse")]:
        with pytest.raises(tables.TableError, match=message):
            tables.render(spec, tmp_path)


def test_text_and_plain_csv_sources(tmp_path):
    (tmp_path / "out.md").write_text("fmnist, 50 steps\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nnote\n")
    assert tables.render("out.md", tmp_path) == "fmnist, 50 steps\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nnote"
    assert tables.render("out.md only=table", tmp_path) == "| a | b |\n|---|---|\n| 1 | 2 |"
    assert tables.render("out.md lines=3:3", tmp_path) == "| a | b |"
    (tmp_path / "sizes.csv").write_text('weights,size\n"int4, group 64",2.30 MB\n')
    assert tables.render("sizes.csv", tmp_path) == "| weights | size |\n|---|---|\n| int4, group 64 | 2.30 MB |"


def test_write_rewrites_only_the_blocks_and_check_finds_stale_ones(tmp_path, capsys):
    tiny_csv(tmp_path, V2)
    doc = tmp_path / "README.md"
    doc.write_text("# t\n\nbefore\n<!-- table: board.csv view=compact top=1 -->\n| old |\n<!-- /table -->\nafter\n"
                   "<!-- table: board.csv names=taylorseer:interval=3 cols=name,macs -->\n<!-- /table -->\n")
    stale = tables.check([doc], root=tmp_path)
    assert [b.line for b in stale] == [4, 8]
    assert main(["docs", "--check", "--root", str(tmp_path)]) == 1
    assert "stale: " in capsys.readouterr().out
    assert len(tables.write([doc], root=tmp_path)) == 2
    text = doc.read_text()
    assert text.startswith("# t\n\nbefore\n<!-- table: board.csv view=compact top=1 -->\n| method |")
    assert "| `taylorseer:interval=3` | 2.70× |\n<!-- /table -->\n" in text and text.endswith("<!-- /table -->\n")
    assert "| old |" not in text and "after\n" in text
    assert tables.check([doc], root=tmp_path) == []
    assert main(["docs", "--check", "--root", str(tmp_path)]) == 0
    assert tables.write([doc], root=tmp_path) == []  # idempotent


def test_an_unclosed_marker_is_an_error(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("<!-- table: x.csv -->\n| x |\n")
    with pytest.raises(tables.TableError, match="never closed"):
        tables.check([doc], root=tmp_path)


# -- links --------------------------------------------------------------------------------------------------------
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        out.add(slug)
    return out


def links(path: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target + " (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_the_docs_pages_are_linked_from_the_readme():
    linked = {Path(t.partition("#")[0]).name for t in links(ROOT / "README.md")}
    for name in ["quickstart.md", "python-api.md", "cli.md", "policies.md", "models.md", "training.md",
                 "protocol.md", "reproducing.md", "results.md"]:
        assert name in linked, f"README.md does not link docs/{name}"
