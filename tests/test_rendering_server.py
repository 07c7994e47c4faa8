"""The server's HTML for model output, as the page's live renderer mirrors it: maths kept for KaTeX, code
blocks labelled with their language, table alignment kept, and the page's assets (vendored libraries, the
code colours) present and up to date."""

import re
import subprocess
import sys

import pytest

from agents_app.domain.rendering import render_markdown
from tests.support import ROOT


def test_maths_is_kept_whole_for_katex_and_prices_stay_text():
    html = render_markdown("Euler: $e^{i\\pi} + 1 = 0$, and $a*b*c$ here; it costs $5 or $10.")
    assert '<span class="math-inline">e^{i\\pi} + 1 = 0</span>' in html
    assert '<span class="math-inline">a*b*c</span>' in html, "no emphasis eaten out of the formula"
    assert "it costs $5 or $10." in html


def test_display_maths_keeps_its_backslashes_and_lines():
    html = render_markdown("$$\n\\begin{matrix} a & b \\\\ c & d \\end{matrix}\n$$")
    assert html == '<p><span class="math-display">\\begin{matrix} a &amp; b \\\\ c &amp; d \\end{matrix}</span></p>'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("`$HOME` is a variable", "<p><code>$HOME</code> is a variable</p>"),
        ("\\$5 and \\$6", "<p>$5 and $6</p>"),
        ("$ x$ and $x $", "<p>$ x$ and $x $</p>"),  # a space inside the dollars: not maths
    ],
)
def test_dollars_that_are_not_maths_stay_text(text, expected):
    assert render_markdown(text) == expected


def test_a_shell_block_keeps_its_dollars_and_gets_its_language_label():
    html = render_markdown("```sh\necho $HOME\n```")
    assert html.startswith('<div class="highlight"><span class="filename">sh</span><pre>')
    assert '<span class="nv">$HOME</span>' in html and "math-" not in html


def test_a_block_without_a_language_has_no_label_and_a_label_cannot_carry_markup():
    assert "filename" not in render_markdown("```\nplain\n```")
    html = render_markdown('```<b>"x\nx\n```')
    assert "<b>" not in html and "onerror" not in html


def test_table_alignment_survives_as_an_attribute():
    html = render_markdown("| a | b |\n| :-- | --: |\n| 1 | 2 |")
    assert '<th align="left">a</th>' in html and '<td align="right">2</td>' in html
    assert "style" not in html


def test_model_html_cannot_add_other_attributes_to_the_maths_and_label_spans():
    html = render_markdown('<span class="math-inline banner" onclick="x()">t</span>')
    assert html == '<p><span class="math-inline">t</span></p>'


def test_the_code_colours_in_content_css_are_what_pygments_generates():
    done = subprocess.run(
        [sys.executable, "scripts/pygments_css.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    css = (ROOT / "static" / "chorus" / "content.css").read_text()
    assert ':root[data-theme="dark"] .highlight .k {' in css
    assert re.search(
        r"@media \(prefers-color-scheme: dark\) \{\n  :root:not\(\[data-theme=\"light\"\]\) .highlight", css
    )


def test_the_vendored_libraries_are_the_scripts_versions_with_their_licenses():
    script = (ROOT / "scripts" / "vendor-static.sh").read_text()
    for lib, variable in (("markdown-it", "MARKDOWN_IT"), ("dompurify", "DOMPURIFY"), ("katex", "KATEX")):
        version = re.search(rf"^{variable}=(\S+)$", script, re.MULTILINE).group(1)
        folder = ROOT / "static" / "vendor" / lib
        assert (folder / "VERSION").read_text().strip() == version
        assert (folder / "LICENSE").stat().st_size > 500
    fonts = ROOT / "static" / "vendor" / "katex" / "dist" / "fonts"
    css = (ROOT / "static" / "vendor" / "katex" / "dist" / "katex.min.css").read_text()
    assert all((fonts.parent / url).exists() for url in re.findall(r"url\((fonts/[^)]+)\)", css))
    assets = (ROOT / "templates" / "agents_app" / "_rendering_assets.html").read_text()
    assert "http" not in assets, "no CDN: every file is served by Chorus"
