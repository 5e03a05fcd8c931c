"""The built-in texts of the synthetic traffic (``prefstream.sim.traffic``): tasks with a correct
and a confidently wrong answer, prompt phrasings, and the filler, hedges and vague answers that
weaker answers are made of."""

from __future__ import annotations

# (task, concrete correct answer, confidently wrong answer)
TOPICS: tuple[tuple[str, str, str], ...] = (
    ("reverse a list in Python", "Use `xs[::-1]` for a copy; `xs.reverse()` works in place.",
     "Call `sorted(xs)`, sorting always reverses a list."),
    ("read a file line by line in Python", "Use `with open(p) as f:` then `for line in f:`.",
     "Call `f.read(1)` in a loop; files cannot be iterated."),
    ("merge two dicts in Python", "Use `a | b` (3.9+) or `{**a, **b}`; keys of `b` win.",
     "Dicts cannot be merged; convert both to lists and add them."),
    ("remove duplicates from a list keeping order", "Use `list(dict.fromkeys(xs))`.",
     "Use `set(xs)`, which always keeps the original order."),
    ("undo the last git commit but keep changes", "Run `git reset --soft HEAD~1`.",
     "Run `git reset --hard HEAD~1`, which keeps your changes safe."),
    ("create a branch in git", "Run `git switch -c topic`; older git: `git checkout -b topic`.",
     "Run `git branch --delete topic` to create it."),
    ("find large files on Linux", "Run `du -ah . | sort -rh | head -20`.",
     "Run `ls -z`, which sorts files by size."),
    ("see which process uses a port", "Run `ss -ltnp | grep :8080` or `lsof -i :8080`.",
     "Run `ping 8080` to see the owning process."),
    ("convert a string to an integer in JavaScript", "Use `Number.parseInt(s, 10)`; check `isNaN`.",
     "Call `s.toInteger()`, every string has it."),
    ("deep copy an object in JavaScript", "Use `structuredClone(obj)`; it copies nested values.",
     "Write `const copy = obj;`, which copies every nested field."),
    ("join two tables in SQL", "Use `FROM a JOIN b ON a.id = b.a_id`; LEFT JOIN keeps all of a.",
     "Use `FROM a, b` with no condition; SQL matches rows itself."),
    ("count rows per group in SQL", "Use `SELECT k, COUNT(*) FROM t GROUP BY k`.",
     "Use `SELECT COUNT(k) FROM t ORDER BY k`, which groups by k."),
    ("make an HTTP request in Python", "Use `requests.get(url, timeout=10)` and check the status.",
     "Use `urllib.fetch(url)`, the built-in async client."),
    ("parse JSON in Python", "Use `json.loads(text)` for strings and `json.load(f)` for files.",
     "Use `eval(text)`; it is the safe way to parse JSON."),
    ("sort a list of dicts by a key in Python", "Use `sorted(rows, key=lambda r: r['age'])`.",
     "Dicts are unordered, so a list of dicts cannot be sorted."),
    ("time a piece of Python code", "Use `time.perf_counter()` around it, or `python -m timeit`.",
     "Call `time.sleep()`, which returns the elapsed time."),
    ("create a virtual environment in Python", "Run `python -m venv .venv`, then activate it.",
     "Run `pip install venv --global`; environments are shared."),
    ("handle exceptions in Python", "Use `try:` and catch only `except KeyError:`.",
     "Put `except: pass` everywhere; hiding errors makes code robust."),
    ("center a div in CSS", "Give the parent `display: grid; place-items: center`.",
     "Use `<center>` tags; CSS cannot center block elements."),
    ("write a for loop in Bash", "Use `for f in *.txt; do echo \"$f\"; done`.",
     "Bash has no loops; run the script once per file."),
    ("rename many files on Linux", "Use `for f in *.jpeg; do mv \"$f\" \"${f%.*}.jpg\"; done`.",
     "Run `cp -r` on the folder, which renames its files."),
    ("set an environment variable on Linux", "Run `export NAME=value`; put it in `~/.bashrc`.",
     "Edit `/etc/hosts` and add a `NAME=value` line."),
    ("compute the mean of a column in pandas", "Use `df['price'].mean()`; it skips NaN by default.",
     "Use `df.sum() / 0` to get the mean."),
    ("read a CSV file with pandas", "Use `pd.read_csv('data.csv')`; pass `sep=';'` if needed.",
     "Use `pd.open('data.csv').rows()`."),
    ("free disk space used by Docker", "Run `docker system prune`, plus `--volumes`.",
     "Delete `/var/lib/docker` by hand while the daemon runs."),
    ("write a unit test in Python", "Write `def test_add(): assert add(1, 2) == 3`, run `pytest`.",
     "Tests are not needed if the code ran once without errors."),
    ("format a date in Python", "Use `d.strftime('%Y-%m-%d')`, or `d.isoformat()` for ISO 8601.",
     "Use `str(d)[::-1]`, the standard date format."),
    ("match an email with a regex", "Use `^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$`, then send a check mail.",
     "Use `.*`, which matches only valid emails."),
    ("make a function async in JavaScript", "Declare `async function load()` and `await` promises.",
     "Wrap the body in `setTimeout`; that makes it async."),
    ("compare two files on Linux", "Run `diff -u a.txt b.txt`; use `cmp` for binary files.",
     "Run `cat a.txt b.txt` and compare by eye; there is no tool."),
)
PHRASINGS = (
    "How do I {}?", "How can I {}?", "What is the best way to {}?", "Can you show me how to {}?",
    "Quick question: how do I {}?", "Explain how to {}.",
)
FILLERS = (
    "Good question.", "Here is the short version.", "This comes up a lot.", "Hope this helps!",
    "Let me explain step by step.", "Many people run into this.", "There are a few approaches.",
    "Let me know if you need more detail.", "It is worth testing on a small example first.",
    "The documentation covers the edge cases.", "Happy coding!", "That is a common task.",
    "I will keep this brief.", "Please double-check against your version.",
)
HEDGES = ("I think that is it, roughly.", "Not sure about the details.", "Something like that.")
VAGUE = (
    "It depends on your setup and what you want to achieve.",
    "There are many ways to do this; search online for tutorials.",
    "Consider consulting the official documentation or a colleague.",
)



def first_clause(text: str) -> str:
    """``text`` up to its first "; " outside backticks (an incomplete answer)."""
    parts = text.split("; ")
    for i in range(1, len(parts)):
        head = "; ".join(parts[:i])
        if head.count("`") % 2 == 0:
            return head
    return text.rstrip(".")
