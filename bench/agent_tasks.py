"""The agent evaluation's tasks: the kinds users give such agents, each with the files it
starts from, and a deterministic grader: a Python script run in the sandbox once the task has
ended, which exits 0 when the task's result is right (and prints why not, else).

``{web}`` in a prompt or a grader is the base URL of the suite's own pages (agent_pages.py).
``solution`` is what a scripted model answers for the task (the plans, in order, then the
verdict): the CI test runs the harness with it; a real model never sees it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Every grader starts with this: the home, `expect` to fail with a reason, and any error
# (a file that is not JSON, say) a failure with its words.
GRADER_HEAD = """\
import csv, json, pathlib, subprocess, sys, urllib.request
HOME = pathlib.Path.home()
def failed(kind, error, trace):
    print("FAIL:", kind.__name__, error)
    sys.exit(1)
sys.excepthook = failed
def expect(condition, why):
    if not condition:
        print("FAIL:", why)
        sys.exit(1)
def text(name):
    path = HOME / name
    expect(path.is_file(), f"{name} is missing")
    return path.read_text()
def run(*args):
    return subprocess.run(["python3", *args], cwd=HOME, capture_output=True, text=True)
"""


@dataclass
class EvalTask:
    name: str
    kind: str  # files | script | fix | multistep | web | refused
    prompt: str
    grader: str  # Python after GRADER_HEAD; reaching its end is a pass
    files: dict[str, str] = field(default_factory=dict)
    solution: list[dict[str, Any]] = field(default_factory=list)


def _lines(*lines: str) -> str:
    return "\n".join(lines) + "\n"


LOG = _lines(
    *(f"2026-01-0{d % 9 + 1} {'ERROR' if d % 7 == 0 else 'INFO'} event {d}" for d in range(60))
)
SALES = _lines(
    "region,amount",
    *(f"{['north', 'south', 'east'][i % 3]},{(i * 37) % 200 + 5}" for i in range(24)),
)
SALES_ROWS = [line.split(",") for line in SALES.splitlines()[1:]]
TOTALS = {r: sum(int(a) for reg, a in SALES_ROWS if reg == r) for r in ("north", "south", "east")}
USERS = [
    {"name": "Grace", "email": "grace@example.org", "age": 45},
    {"name": "Ada", "email": "ada@example.org", "age": 36},
    {"name": "Linus", "email": "linus@example.org", "age": 28},
    {"name": "Barbara", "email": "barbara@example.org", "age": 52},
]
STORY = _lines(
    "The cat sat on the mat. The dog sat by the cat.",
    "A bird sang to the cat and the dog; the mat was warm.",
)
NUMBERS = _lines(*(str(n) for n in (12, 7, 30, 5, 18, 41, 9)))
PRIMES_BELOW_50 = "2 3 5 7 11 13 17 19 23 29 31 37 41 43 47"


def _files_tasks() -> list[EvalTask]:
    return [
        EvalTask(
            "count-lines", "files",
            "How many lines does data/log.txt have? Write just the number to answer.txt.",
            "expect(text('answer.txt').strip() == '60', 'answer.txt is not 60')",
            {"data/log.txt": LOG},
        ),
        EvalTask(
            "count-errors", "files",
            "Count the lines of logs/app.log that contain ERROR and write the count (just the "
            "number) to errors.txt.",
            "expect(text('errors.txt').strip() == '9', 'errors.txt is not 9')",
            {"logs/app.log": LOG},
            solution=[
                {"steps": [{"kind": "terminal",
                            "command": "grep -c ERROR logs/app.log > errors.txt",
                            "check": {"kind": "file_exists", "value": "errors.txt"}}]},
                {"ok": True, "answer": "9", "reason": "counted"},
            ],
        ),
        EvalTask(
            "find-config", "files",
            "Somewhere under project/ there is one file whose name ends in .cfg. Write its path, "
            "relative to the home directory (like project/a/b.cfg), to found.txt.",
            "expect(text('found.txt').strip().removeprefix('./') == 'project/src/deep/app.cfg', "
            "'wrong path')",
            {"project/README": "x\n", "project/src/main.py": "print(1)\n",
             "project/src/deep/app.cfg": "[app]\n", "project/docs/guide.txt": "cfg\n"},
        ),
        EvalTask(
            "find-mention", "files",
            "Which file in notes/ mentions the quarterly budget? Write its file name (only the "
            "name, like x.txt) to answer.txt.",
            "expect(text('answer.txt').strip() == 'tuesday.txt', 'not tuesday.txt')",
            {"notes/monday.txt": "Standup, hiring plan.\n",
             "notes/tuesday.txt": "Review of the quarterly budget with finance.\n",
             "notes/wednesday.txt": "Budget for the party: snacks.\n"},
        ),
        EvalTask(
            "csv-totals", "files",
            "sales.csv has the columns region and amount. Write the total amount per region to "
            "totals.json, as one JSON object mapping each region to its total (a number).",
            f"got = json.loads(text('totals.json'))\n"
            f"expect({{k: int(v) for k, v in got.items()}} == {TOTALS!r}, f'totals {{got}}')",
            {"sales.csv": SALES},
        ),
        EvalTask(
            "csv-filter", "files",
            "Write to big.csv the rows of sales.csv whose amount is over 100, in their order, "
            "with the same header line.",
            "rows = list(csv.reader(text('big.csv').splitlines()))\n"
            "expect(rows[0] == ['region', 'amount'], 'header')\n"
            f"expect(rows[1:] == {[r for r in SALES_ROWS if int(r[1]) > 100]!r}, 'rows')",
            {"sales.csv": SALES},
        ),
        EvalTask(
            "json-to-csv", "files",
            "users.json is a list of users. Write users.csv with the header name,email and one "
            "row per user, sorted by name.",
            "rows = list(csv.reader(text('users.csv').splitlines()))\n"
            "expect(rows[0] == ['name', 'email'], 'header')\n"
            f"expect(rows[1:] == {sorted([u['name'], u['email']] for u in USERS)!r}, 'rows')",
            {"users.json": json.dumps(USERS, indent=2)},
        ),
        EvalTask(
            "json-value", "files",
            "Write the database port from config.json (the value of database.port) to port.txt.",
            "expect(text('port.txt').strip() == '6543', 'not 6543')",
            {"config.json": json.dumps({"app": {"port": 8080},
                                        "database": {"host": "db", "port": 6543}})},
        ),
        EvalTask(
            "csv-to-json", "files",
            "Convert inventory.csv to inventory.json: a JSON list of objects with the keys item "
            "(text) and quantity (an integer), in the file's order.",
            "got = json.loads(text('inventory.json'))\n"
            "expect(got == [{'item': 'bolt', 'quantity': 120}, {'item': 'nut', 'quantity': 80},"
            " {'item': 'gear', 'quantity': 7}], f'got {got}')",
            {"inventory.csv": "item,quantity\nbolt,120\nnut,80\ngear,7\n"},
        ),
        EvalTask(
            "top-words", "files",
            "Write the three most frequent words of story.txt (lowercased, punctuation "
            "removed), most frequent first, one per line, to top3.txt.",
            "expect(text('top3.txt').split() == ['the', 'cat', 'sat'] or "
            "text('top3.txt').split()[:2] == ['the', 'cat'], 'not the, cat, ...')",
            {"story.txt": STORY},
        ),
        EvalTask(
            "replace-text", "files",
            "In report.md, replace every 'colour' with 'color' (change the file in place).",
            "body = text('report.md')\n"
            "expect('colour' not in body and body.count('color') == 3, 'not replaced')",
            {"report.md": "# Colours\nThe colour red.\nA colour wheel; colour theory.\n"},
        ),
        EvalTask(
            "dedupe", "files",
            "emails.txt has duplicate lines. Write its distinct lines, sorted, to unique.txt.",
            "expect(text('unique.txt').split() == ['a@x.org', 'b@x.org', 'c@x.org'], 'lines')",
            {"emails.txt": "c@x.org\na@x.org\nc@x.org\nb@x.org\na@x.org\n"},
        ),
        EvalTask(
            "largest-file", "files",
            "Which file in files/ is the largest? Write its name (like x.bin) to largest.txt.",
            "expect(text('largest.txt').strip().split('/')[-1] == 'beta.dat', 'not beta.dat')",
            {"files/alpha.dat": "a" * 300, "files/beta.dat": "b" * 5000,
             "files/gamma.dat": "c" * 1200},
        ),
    ]  # fmt: skip


CALC_BROKEN = "def answer()\n    return 6 * 7\n\nprint(answer())\n"
MATHUTIL = "def mean(xs):\n    return sum(xs) / (len(xs) - 1)\n\ndef double(x):\n    return x + x\n"
MATHUTIL_TEST = _lines(
    "import unittest",
    "from mathutil import mean, double",
    "class T(unittest.TestCase):",
    "    def test_mean(self):",
    "        self.assertEqual(mean([2, 4, 6]), 4)",
    "    def test_double(self):",
    "        self.assertEqual(double(5), 10)",
    "if __name__ == '__main__':",
    "    unittest.main()",
)
REPORT = _lines(
    "import json",
    "records = json.load(open('scores.json'))",
    "print(sum(r['score'] for r in records))",
)
MAKE_DATA = _lines(
    "import pathlib",
    "pathlib.Path('out/data.txt').write_text('\\n'.join(str(n * n) for n in range(10)))",
    "print('written')",
)


def _script_tasks() -> list[EvalTask]:
    return [
        EvalTask(
            "primes-script", "script",
            "Write primes.py, which prints the primes below 50 separated by single spaces, "
            "and run it.",
            f"out = run('primes.py').stdout.strip()\nexpect(out == {PRIMES_BELOW_50!r}, out)",
        ),
        EvalTask(
            "fizzbuzz", "script",
            "Write fizzbuzz.py: given N as its argument, it prints 1..N one per line, with Fizz "
            "for multiples of 3, Buzz for multiples of 5, FizzBuzz for both. Run it with 15.",
            "out = run('fizzbuzz.py', '15').stdout.split()\n"
            "expect(len(out) == 15 and out[2] == 'Fizz' and out[4] == 'Buzz' and "
            "out[14] == 'FizzBuzz' and out[0] == '1', out)",
        ),
        EvalTask(
            "stats", "script",
            "numbers.txt has one number a line. Write their mean and median, as two lines "
            "'mean: X' and 'median: Y' (X with 2 decimals), to stats.txt.",
            "got = text('stats.txt')\n"
            "expect('mean: 17.43' in got and ('median: 12' in got), got)",
            {"numbers.txt": NUMBERS},
        ),
        EvalTask(
            "fix-syntax", "fix",
            "calc.py fails to run. Fix it so that `python3 calc.py` prints 42.",
            "out = run('calc.py').stdout.strip()\nexpect(out == '42', out)",
            {"calc.py": CALC_BROKEN},
        ),
        EvalTask(
            "fix-tests", "fix",
            "The tests in test_mathutil.py fail (run them with python3 -m unittest "
            "test_mathutil). Fix mathutil.py, not the tests, so that they pass.",
            "done = run('-m', 'unittest', 'test_mathutil')\n"
            "expect(done.returncode == 0, done.stderr[-300:])\n"
            f"expect(text('test_mathutil.py') == {MATHUTIL_TEST!r}, 'the tests were changed')",
            {"mathutil.py": MATHUTIL, "test_mathutil.py": MATHUTIL_TEST},
        ),
        EvalTask(
            "fix-missing-key", "fix",
            "report.py crashes on scores.json. Fix report.py so that records without a score "
            "count as 0, and run it: it should print the total.",
            "out = run('report.py').stdout.strip()\nexpect(out == '17', out)",
            {"report.py": REPORT,
             "scores.json": json.dumps([{"score": 10}, {"name": "x"}, {"score": 7}])},
        ),
    ]  # fmt: skip


def _multistep_tasks() -> list[EvalTask]:
    return [
        EvalTask(
            "make-data", "multistep",
            "Run make_data.py (do not change it) so that out/data.txt exists, then write the "
            "sum of the numbers in out/data.txt to sum.txt.",
            "expect(text('out/data.txt').split()[-1] == '81', 'out/data.txt')\n"
            "expect(text('sum.txt').strip() == '285', 'sum.txt is not 285')\n"
            f"expect(text('make_data.py') == {MAKE_DATA!r}, 'make_data.py was changed')",
            {"make_data.py": MAKE_DATA},
        ),
        EvalTask(
            "archive", "multistep",
            "Make a gzip-compressed tar archive backup.tar.gz of the docs/ folder, then write "
            "the list of the files in it to listing.txt.",
            "import tarfile\n"
            "names = tarfile.open(HOME / 'backup.tar.gz').getnames()\n"
            "expect(any(n.endswith('docs/a.md') for n in names), names)\n"
            "expect('b.md' in text('listing.txt'), 'listing.txt')",
            {"docs/a.md": "# A\n", "docs/b.md": "# B\n"},
        ),
        EvalTask(
            "venv-package", "multistep",
            "Create a Python virtual environment in env/ and write the Python version it runs "
            "(the output of its python's --version) to version.txt.",
            "expect((HOME / 'env' / 'bin' / 'python').exists(), 'no env/bin/python')\n"
            "expect(text('version.txt').startswith('Python 3'), 'version.txt')",
        ),
    ]  # fmt: skip


PRODUCTS = [("Blue Widget", 12.5), ("Red Gadget", 99.0), ("Green Gizmo", 47.25)]


def _web_tasks() -> list[EvalTask]:
    return [
        EvalTask(
            "web-priciest", "web",
            "The page {web}/products.html lists products and their prices. Write the name of "
            "the most expensive product to answer.txt.",
            "expect(text('answer.txt').strip() == 'Red Gadget', 'not Red Gadget')",
            solution=[
                {"steps": [
                    {"kind": "file", "op": "write", "path": "fetch.py", "content":
                     "import re, urllib.request\n"
                     "page = urllib.request.urlopen('{web}/products.html').read().decode()\n"
                     "rows = re.findall(r'<td>([^<]+)</td><td>([0-9.]+)</td>', page)\n"
                     "best = max(rows, key=lambda r: float(r[1]))[0]\n"
                     "open('answer.txt', 'w').write(best)\nprint(best)\n"},
                    {"kind": "terminal", "command": "python3 fetch.py",
                     "check": {"kind": "output_contains", "value": "Gadget"}},
                ]},
                {"ok": True, "answer": "Red Gadget", "reason": "read from the page"},
            ],
        ),
        EvalTask(
            "web-table", "web",
            "Save the products table of {web}/products.html as products.csv with the header "
            "name,price and one row per product, in the page's order.",
            "rows = list(csv.reader(text('products.csv').splitlines()))\n"
            "expect(rows[0] == ['name', 'price'], 'header')\n"
            f"expect([(n, float(p)) for n, p in rows[1:]] == {PRODUCTS!r}, rows)",
        ),
        EvalTask(
            "web-form", "web",
            "Order 3 of the cheapest product on {web}/products.html for Ada Lovelace, "
            "ada@example.org, through the order form at {web}/order.html.",
            "orders = json.load(urllib.request.urlopen('{web}/orders.json'))\n"
            "expect(orders, 'no order was submitted')\n"
            "last = orders[-1]\n"
            "expect(last.get('product') == 'Blue Widget', last)\n"
            "expect(last.get('quantity') == '3', last)\n"
            "expect(last.get('name') == 'Ada Lovelace' and "
            "last.get('email') == 'ada@example.org', last)",
        ),
    ]  # fmt: skip


def _refused_tasks() -> list[EvalTask]:
    return [
        EvalTask(
            "sum-numbers", "refused",
            "Sum the numbers in nums.txt (one per line) and write the sum to sum.txt.",
            "expect(text('sum.txt').strip() == '122', 'not 122')",
            {"nums.txt": NUMBERS},
            solution=[
                # awk first, as models often do: refused by the policy, then rephrased.
                {"steps": [{"kind": "terminal",
                            "command": "awk '{s += $1} END {print s}' nums.txt > sum.txt"}]},
                {"steps": [
                    {"kind": "file", "op": "write", "path": "sum.py", "content":
                     "total = sum(int(n) for n in open('nums.txt'))\n"
                     "open('sum.txt', 'w').write(str(total))\nprint(total)\n"},
                    {"kind": "terminal", "command": "python3 sum.py",
                     "check": {"kind": "output_contains", "value": "122"}},
                ]},
                {"ok": True, "answer": "122", "reason": "summed"},
            ],
        ),
        EvalTask(
            "count-per-file", "refused",
            "For each .txt file in batch/, write a line 'NAME COUNT' (its name and its number "
            "of lines) to counts.txt, sorted by name.",
            "expect(text('counts.txt').split('\\n')[:3] == ['a.txt 1', 'b.txt 3', 'c.txt 2'], "
            "text('counts.txt'))",
            {"batch/a.txt": "1\n", "batch/b.txt": "1\n2\n3\n", "batch/c.txt": "1\n2\n"},
        ),
        EvalTask(
            "env-variable", "refused",
            "Write the home directory's path, as the shell's $HOME has it, to home.txt.",
            "expect(text('home.txt').strip() == str(HOME), text('home.txt'))",
        ),
    ]  # fmt: skip


TASKS: list[EvalTask] = [
    *_files_tasks(),
    *_script_tasks(),
    *_multistep_tasks(),
    *_web_tasks(),
    *_refused_tasks(),
]
