"""Check a built Allure report in a real headless Chromium: the number of test cases it shows
equals the number of tests pytest ran, and its environment panel is filled in.

    python tests/report_in_browser.py allure-report allure-results [--chromium chromium]

The report is served on loopback (its pages load their data over HTTP), Chromium renders its
overview and the shown count is read from the page. One line says what was found; exit 1 when
the counts differ.
"""

import argparse
import functools
import re
import subprocess
import sys
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-quic")
RENDER_MS = 20000  # virtual time the page gets to load its data and draw
SHOWN = re.compile(r'class="splash__title">(\d+)<')


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves the report's files without a log line per request."""

    def log_message(self, format, *args):
        pass


def tests_run(results):
    """How many tests pytest ran, as conftest.py wrote it into environment.properties."""
    for line in (Path(results) / "environment.properties").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "tests.run":
            return int(value)
    raise ValueError(f"{results}/environment.properties has no tests.run")


def rendered_overview(report, chromium):
    """The overview page's DOM after Chromium ran its scripts, the report served on loopback."""
    handler = functools.partial(QuietHandler, directory=str(report))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server, \
            tempfile.TemporaryDirectory() as profile:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            page = subprocess.run(
                [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                 f"--virtual-time-budget={RENDER_MS}", "--dump-dom",
                 f"http://127.0.0.1:{server.server_address[1]}/index.html"],
                capture_output=True, text=True, timeout=120, check=True)
        finally:
            server.shutdown()
    return page.stdout


def main(argv=None):
    """Render the report, compare its count of test cases with pytest's; 0 when they agree."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report")
    parser.add_argument("results")
    parser.add_argument("--chromium", default="chromium")
    args = parser.parse_args(argv)
    expected = tests_run(args.results)
    page = rendered_overview(args.report, args.chromium)
    shown = SHOWN.search(page)
    if shown is None:
        print(f"{args.report}: Chromium shows no count of test cases", file=sys.stderr)
        return 1
    if int(shown[1]) != expected or "grpcio" not in page:
        print(f"{args.report}: Chromium shows {shown[1]} test cases and "
              f"{'an' if 'grpcio' in page else 'no'} environment panel; pytest ran {expected}",
              file=sys.stderr)
        return 1
    print(f"{args.report}: Chromium shows {expected} test cases, as many as pytest ran, "
          "and the environment panel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
