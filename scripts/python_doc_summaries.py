#!/usr/bin/env python3
"""Summary documents from Python's HTML documentation (Debian's python3.11-doc).

Writes two JSONL files of {id, context, reference} to OUT_DIR:
  python-howto.jsonl     each HOWTO that opens with an "Abstract": the abstract is the
                         reference, the rest of the page the context;
  python-whatsnew.jsonl  each "What's New" page with a "Summary - Release highlights"
                         section: that section is the reference, the rest the context.
Both summaries are written by the documents' authors. Usage: python_doc_summaries.py HTML_DIR OUT_DIR
"""
import json
import pathlib
import re
import sys
from html.parser import HTMLParser

BLOCKS = {"p", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "div", "section", "dt", "dd", "br", "tr", "aside"}


class Page(HTMLParser):
    """Text of the main body, with the abstract and the release highlights kept apart."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts = {"body": [], "abstract": [], "highlights": []}
        self.depth = 0  # open tags inside div.body (0: outside)
        self.region = []  # stack of (depth at which it opened, region name)
        self.skip_at = None  # depth of a tag whose text is dropped (header links, scripts)
        self.topic_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth == 0:
            if tag == "div" and a.get("class") == "body":
                self.depth = 1
            return
        self.depth += 1
        cls = a.get("class") or ""
        if self.skip_at is None and (tag in ("script", "style") or "headerlink" in cls):
            self.skip_at = self.depth
        if tag == "aside" and "topic" in cls.split():
            self.region.append((self.depth, "topic"))
        if tag == "section" and a.get("id") == "summary-release-highlights":
            self.region.append((self.depth, "highlights"))
        if tag == "p" and "topic-title" in cls:
            self.topic_title = True
        if tag in BLOCKS:
            self.emit("\n")

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        if tag in BLOCKS:
            self.emit("\n")
        if self.skip_at == self.depth:
            self.skip_at = None
        if self.region and self.region[-1][0] == self.depth:
            self.region.pop()
        self.topic_title = False
        self.depth -= 1

    def handle_startendtag(self, tag, attrs):
        if self.depth and tag == "br":
            self.emit("\n")

    def handle_data(self, data):
        if self.depth == 0 or self.skip_at is not None:
            return
        if self.topic_title:
            # An "Abstract" topic's text goes to the abstract; other topics stay in the body.
            if data.strip() == "Abstract" and self.region and self.region[-1][1] == "topic":
                self.region[-1] = (self.region[-1][0], "abstract")
            return
        self.emit(data)

    def emit(self, text):
        name = self.region[-1][1] if self.region else "body"
        self.parts["body" if name == "topic" else name].append(text)

    def text(self, name):
        raw = "".join(self.parts[name])
        paragraphs = [re.sub(r"[ \t\r\f\v]+", " ", p).strip() for p in re.split(r"\n\s*\n|\n", raw)]
        return "\n".join(p for p in paragraphs if p)


def main(html_dir, out_dir):
    html_dir, out_dir = pathlib.Path(html_dir), pathlib.Path(out_dir)
    for kind, folder, part in (("howto", "howto", "abstract"), ("whatsnew", "whatsnew", "highlights")):
        rows = []
        for f in sorted((html_dir / folder).glob("*.html")):
            page = Page()
            page.feed(f.read_text(encoding="utf-8"))
            reference = page.text(part)
            if len(reference.split()) >= 10:  # 3.8's highlights section is empty
                # The summary heading itself is not part of the summary.
                reference = re.sub(r"^Summary . Release [Hh]ighlights\n", "", reference)
                rows.append({"id": f"{folder}/{f.stem}", "context": page.text("body"), "reference": reference})
        with open(out_dir / f"python-{kind}.jsonl", "w", encoding="utf-8") as out:
            for r in rows:
                out.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"python-{kind}.jsonl: {len(rows)} documents", file=sys.stderr)


if __name__ == "__main__":
    main(*sys.argv[1:])
