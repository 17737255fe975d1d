"""The whitelisted terminal: a corpus of bypass attempts, each refused with a reason that
names what was refused; allowed commands judged allowed and then run by the real guest
terminal; and RunStep refusing a command before the guest sees it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from guest_agent.execution import Execution
from guest_agent.terminal import run_command
from guest_agent.user import WORKSPACE
from sandboxes.models import TerminalStep
from sandboxes.policy import CommandPolicy, judge, load_policy
from sandboxes.policy.shell import parse
from store import events
from store.events import EventType
from tests.activities.test_run_step import link_activities, sqlite_engine, step_request
from tests.guest_agent.test_agent import guest_link

__all__ = ["sqlite_engine"]  # a fixture, used by name

POLICY = load_policy("default")

# (id, command, a piece of the reason that names what was refused)
BYPASSES = [
    ("python-c", "python3 -c 'import os; os.system(\"id\")'", "python3 -c"),
    ("python-c-cluster", "python3 -Bc 'print(1)'", "-c"),
    ("python-stdin", "echo 'print(1)' | python3", "without a script file"),
    ("python-dash", "python3 - < x.py", "without a script file"),
    ("python-m-http", "python3 -m http.server", "http.server"),
    ("python-m-attached", "python3 -mhttp.server", "http.server"),
    ("python-abs-script", "python3 /usr/lib/python3.11/http/server.py", "outside the workspace"),
    ("python-path", "/usr/bin/python3 -c 1", "by its path"),
    ("python2", "python -c 1", "`python` is not an allowed program"),
    ("bash-c", "bash -c 'rm -rf /'", "`bash` is not an allowed program"),
    ("sh", "sh x.sh", "`sh` is not an allowed program"),
    ("sh-pipe", "cat x.sh | sh", "`sh` is not an allowed program"),
    ("env-cmd", "env X=1 ls", "`env` takes at most 0 arguments"),
    ("env-i", "env -i bash", "`env` takes at most 0 arguments"),
    ("assign-path", "PATH=/tmp ls", "`PATH`"),
    ("assign-ld-preload", "LD_PRELOAD=/tmp/x.so ls", "`LD_PRELOAD`"),
    ("assign-alone", "X=1", "`X`"),
    ("assign-append", "PATH+=:/tmp ls", "`PATH`"),
    ("find-exec", "find . -exec rm {} ;", "{"),
    ("find-exec-quoted", "find . -exec rm '{}' ';'", "find -exec"),
    ("find-execdir", "find . -execdir sh -c id ';'", "find -execdir"),
    ("find-ok", "find . -ok rm '{}' ';'", "find -ok"),
    ("find-delete", "find / -delete", "find -delete"),
    ("find-fprint", "find . -fprint /etc/x", "find -fprint"),
    ("xargs", "ls | xargs rm", "`xargs` is not an allowed program"),
    ("awk-system", "awk 'BEGIN{system(\"id\")}'", "`awk` is not an allowed program"),
    ("sed-e-command", "sed '1e id' f.txt", "the `e` command"),
    ("sed-s-e-flag", "sed 's/x/id/e' f.txt", "`s///e`"),
    ("sed-w-file", "sed -n 'w /etc/passwd' f.txt", "the `w` command"),
    ("sed-s-w-flag", "sed 's/a/b/w out' f.txt", "`s///w`"),
    ("sed-W", "sed -e p -e 'W x' f.txt", "the `W` command"),
    ("sed-script-file", "sed -f evil.sed f.txt", "sed -f"),
    ("sed-in-place-outside", "sed -i s/a/b/ /etc/hosts", "outside the workspace"),
    ("perl-e", "perl -e 'exec \"sh\"'", "`perl` is not an allowed program"),
    ("node-e", "node -e 'require(\"child_process\")'", "`node` is not an allowed program"),
    ("tar-to-command", "tar -tf a.tar --to-command=sh", "--to-command"),
    ("tar-to-command-prefix", "tar -tf a.tar --to-com=sh", "--to-command"),
    ("tar-checkpoint", "tar -cf a.tar --checkpoint=1 --checkpoint-action=exec=sh .", "checkpoint"),
    ("tar-bundled-I", "tar tIf sh a.tar", "`-I`"),
    ("tar-use-compress", "tar --use-compress-program=sh -tf a.tar", "--use-compress-program"),
    ("tar-list-root", "tar -tf a.tar -C /", "outside the workspace"),
    ("git-c-pager", "git -c core.pager=sh log", "git -c"),
    ("git-config-alias", "git config alias.x '!sh'", "alias.x"),
    ("git-upload-pack", "git clone --upload-pack=sh x y", "--upload-pack"),
    ("git-exec-path", "git --exec-path=. status", "--exec-path"),
    ("git-C", "git -C /etc status", "git -C"),
    ("git-subcommand", "git difftool", "`git difftool` is not an allowed subcommand"),
    ("ssh-proxy", "ssh -o ProxyCommand=sh host", "`ssh` is not an allowed program"),
    ("vim-c", "vim -c ':!sh'", "`vim` is not an allowed program"),
    ("less", "less /etc/passwd", "`less` is not an allowed program"),
    ("man", "man ls", "`man` is not an allowed program"),
    ("timeout", "timeout 5 sh", "`timeout` is not an allowed program"),
    ("nice", "nice sh", "`nice` is not an allowed program"),
    ("nohup", "nohup sleep 1", "`nohup` is not an allowed program"),
    ("sudo", "sudo ls", "`sudo` is not an allowed program"),
    ("su", "su -c id", "`su` is not an allowed program"),
    ("chroot", "chroot / sh", "`chroot` is not an allowed program"),
    ("abs-path-ls", "/bin/ls", "by its path"),
    ("dot-script", "./run.sh", "by its path"),
    ("eval", "eval ls", "`eval` is not an allowed program"),
    ("source", "source x.sh", "`source` is not an allowed program"),
    ("dot-source", ". x.sh", "`.` is not an allowed program"),
    ("exec", "exec sh", "`exec` is not an allowed program"),
    ("builtin", "builtin eval ls", "`builtin` is not an allowed program"),
    ("command-builtin", "command sh", "`command` is not an allowed program"),
    ("printf-v", "printf -v PATH /tmp", "printf -v"),
    ("subst-dollar", "echo $(id)", "command or arithmetic substitution"),
    ("subst-backtick", "echo `id`", "backticks"),
    ("subst-in-dquotes", 'echo "$(id)"', "inside double quotes"),
    ("subst-program", "$(echo python3) x.py", "command or arithmetic substitution"),
    ("variable", "echo $HOME", "`$HOME`"),
    ("variable-braces", "ls ${HOME}", "parameter expansion"),
    ("arith", "echo $((1+1))", "substitution"),
    ("ansi-c", "$'\\x73\\x68'", "ANSI-C quoting"),
    ("process-subst-in", "cat <(id)", "process substitution"),
    ("process-subst-out", "ls > >(sh)", "process substitution"),
    ("here-string", "cat <<< x", "here-string"),
    ("heredoc", "cat << EOF", "here-document"),
    ("subshell", "(sh)", "parentheses"),
    ("function", "f() { sh; }; f", "parentheses"),
    ("group", "{ sh; }", "brace"),
    ("brace-expansion", "{python3,-c,print} x", "brace"),
    ("for-loop", "for i in 1 2; do sh; done", "`for` starts a shell compound command"),
    ("while-loop", "while true; do ls; done", "`while`"),
    ("if", "if true; then sh; fi", "`if`"),
    ("negation", "! ls", "`!`"),
    ("double-bracket", "[[ -f x ]]", "`[[`"),
    ("line-continuation", "python3 -\\\nc 1", "line continuation"),
    ("newline-chain", "ls\nsh", "`sh` is not an allowed program"),
    ("semicolon-chain", "ls; sh", "`sh` is not an allowed program"),
    ("and-chain", "true && bash", "`bash` is not an allowed program"),
    ("or-chain", "false || bash", "`bash` is not an allowed program"),
    ("pipe-to-shell", "echo id | bash", "`bash` is not an allowed program"),
    ("background", "sleep 100 &", "background"),
    ("background-chain", "sleep 100 & ls", "background"),
    ("redirect-etc", "echo x > /etc/cron.d/x", "outside the workspace"),
    ("redirect-append-dotdot", "echo x >> ../etc/profile", "outside the workspace"),
    ("redirect-both", "ls &> /etc/x", "outside the workspace"),
    ("redirect-fd", "ls 2> /var/log/x", "outside the workspace"),
    ("redirect-read-outside", "cat < /etc/shadow", "outside the workspace"),
    ("redirect-tilde-escape", "echo x > ~/../etc/x", "outside the workspace"),
    ("redirect-glob", "echo x > *.txt", "a glob"),
    ("glob-program", "/usr/bin/pyth* -c 1", "glob"),
    ("glob-program-relative", "pytho? x.py", "glob"),
    ("glob-option-smuggle", "tar -cf a.tar *", "starts with a wildcard"),
    ("quoted-program", "'bash' -c id", "`bash` is not an allowed program"),
    ("escaped-program", "\\bash -c id", "`bash` is not an allowed program"),
    ("split-quoted-program", "b'a'sh -c id", "`bash` is not an allowed program"),
    ("rm-rf-root", "rm -rf /", "outside the workspace"),
    ("rm-rf-home", "rm -rf ~", "workspace root"),
    ("rm-rf-dot", "rm -rf .", "workspace root"),
    ("rm-no-preserve", "rm -rf --no-preserve-root x", "--no-preserve-root"),
    ("rm-dotdot", "rm -r ../etc", "outside the workspace"),
    ("mv-target-attached", "mv -t/etc x", "outside the workspace"),
    ("cp-target-long", "cp --target-directory=/etc x", "outside the workspace"),
    ("cd-outside", "cd /etc && rm -f passwd", "`cd /etc`"),
    ("cd-then-escape", "cd sub && rm -r ../../etc", "outside the workspace"),
    ("chmod-setuid", "chmod 4755 x", "setuid"),
    ("chmod-setuid-symbolic", "chmod u+s x", "setuid"),
    ("chmod-outside", "chmod 777 /etc/shadow", "outside the workspace"),
    ("tee-outside", "echo x | tee /etc/x", "outside the workspace"),
    ("curl-output-outside", "curl -o /etc/x http://h/", "outside the workspace"),
    ("curl-config", "curl -K cfg http://h/", "curl -K"),
    ("wget-execute", "wget -e 'use_proxy=on' http://h/", "wget -e"),
    ("sort-output-outside", "sort -o /etc/passwd x", "outside the workspace"),
    ("sort-compress-program", "sort --compress-program=sh x", "--compress-program"),
    ("date-set", "date -s 2000-01-01", "date -s"),
    ("hostname-set", "hostname evil", "`hostname` takes at most 0 operands"),
    ("pip-subcommand", "pip config set x y", "`pip config` is not an allowed subcommand"),
    ("pip-target-outside", "pip install --target /usr/lib/x pkg", "outside the workspace"),
    ("python-m-pip-outside", "python3 -m pip install -t /usr/lib/x pkg", "outside the workspace"),
    ("kill", "kill -9 1", "`kill` is not an allowed program"),
    ("tilde-user", "ls ~root", "another user's home"),
    ("control-char", "ls\rsh", "control character"),
    ("escape-char", "echo \x1b[2J", "control character"),
    ("case-terminator", "ls ;; sh", "`;;`"),
    ("empty", "   ", "empty"),
    ("dangling-and", "ls &&", "no command after it"),
    ("step-cwd-outside", "rm -r passwd", "outside the workspace"),
    ("step-cwd-named", "cat a.tar | tar x", "working directory `/etc`"),
    # Found by a security review: option prefixes, `--`, globs starting with `-`, git's
    # global options, python3's ways to read code from the input, missing options.
    ("sed-expression-prefix", "sed -e p --e 'e id' x", "the `e` command"),
    ("sed-label-semicolon", "sed 't;e id' x", "the `e` command"),
    ("sed-label-brace", "sed '/a/{b end};e id' x", "the `e` command"),
    ("sed-line-length", "sed --line-length 1 'e id' x", "the `e` command"),
    ("sed-l-value", "sed -l 1 'e id' x", "the `e` command"),
    ("sed-in-place-prefix", "sed --in 's/a/b/' /etc/passwd", "outside the workspace"),
    ("sed-in-place-short-prefix", "sed --i 's/a/b/' /etc/passwd", "outside the workspace"),
    ("sed-ambiguous-long", "sed --s 's/a/b/' x", "unambiguously"),
    ("rm-after-dashdash", "mkdir ./-- && rm -rf -- --/../../etc", "outside the workspace"),
    ("cp-after-dashdash", "cp x -- --/../../etc/cron.d/x", "outside the workspace"),
    ("tee-after-dashdash", "tee -- --/../../etc/x", "outside the workspace"),
    ("rm-long-word-path", "rm -rf --/../../etc", "outside the workspace"),
    ("glob-dash-dash", "tar cf a.tar --*", "starts with `-`"),
    ("glob-dash", "tar cf a.tar -*", "starts with `-`"),
    ("glob-dash-after-dashdash", "rm -rf -- --*/../../etc", "starts with `-`"),
    (
        "git-namespace-log",
        "git --namespace log filter-branch -f --tree-filter 'id>o' HEAD",
        "global",
    ),
    ("git-namespace-status", "git --namespace status config core.fsmonitor 'id>o'", "global"),
    ("git-git-dir", "git --git-dir=x log", "global option"),
    ("python-dashdash-stdin", "echo 'print(1)' | python3 --", "without a script file"),
    ("python-dashdash-dash", "python3 -- -", "without a script file"),
    ("python-dashdash-dashdash", "python3 -- --", "without a script file"),
    ("python-interactive", "python3 -i x.py", "python3 -i"),
    ("python-json-tool-outside", "python3 -m json.tool in.json /etc/x", "outside the workspace"),
    ("python-venv-outside", "python3 -m venv /opt/v", "outside the workspace"),
    ("python-pytest", "python3 -m pytest --basetemp=/etc", "pytest"),
    ("python-hash-pycs", "python3 --check-hash-based-pycs always /usr/lib/x.py", "check-hash"),
    ("tar-rmt-command", "tar -tf a.tar --rmt-command=sh", "--rmt-command"),
    ("tar-rsh-command", "tar -tf h:a.tar --rsh-command=sh", "--rsh-command"),
    ("tar-use-compress-prefix", "tar -tf a.tar --use-comp sh", "--use-compress-program"),
    ("tar-I", "tar -I sh -tf a.tar", "tar -I"),
    ("tar-to-command-space", "tar -tf a.tar --to-command sh", "--to-command"),
    ("tar-checkpoint-action-prefix", "tar -cf a.tar --checkpoint-ac=exec=sh .", "checkpoint"),
    ("curl-write-out", "curl -w '%output{/etc/x}' http://h/", "curl -w"),
    ("curl-write-out-long", "curl --write-out x http://h/", "--write-out"),
    ("wget-rejected-log", "wget --rejected-log /etc/x http://h/", "outside the workspace"),
    ("wget-hsts-file", "wget --hsts-file=/etc/x http://h/", "outside the workspace"),
    ("sort-temp-dir", "sort -T /etc x", "outside the workspace"),
    ("sort-temp-dir-long", "sort --temporary-directory=/etc x", "outside the workspace"),
    ("chmod-setuid-padded", "chmod 04755 x", "setuid"),
    ("chmod-setuid-dashdash", "chmod -- 4755 x", "setuid"),
    ("pip-python", "pip --python /usr/bin/python3 install x", "--python"),
    ("python-m-pip-python", "python3 -m pip --python=/tmp/p install x", "--python"),
    ("non-ascii-digit-fd", "echo \u00b2>/etc/x", "outside the workspace"),
    # Issue 16: the policy's parse is the shell's parse.
    ("find-dashdash-exec", "find -- . -maxdepth 0 -exec bash -c id ';'", "find -exec"),
    ("find-dashdash-delete", "find -- . -delete", "find -delete"),
    ("find-dashdash-fprintf", "find -- . -fprintf /etc/x %p", "find -fprintf"),
    ("glob-empty-quotes-tar", "tar cf a.tar ''*", "starts with a wildcard"),
    ("glob-empty-dquotes-sed", 'sed -n p ""*', "starts with a wildcard"),
    ("glob-empty-quotes-python", "python3 ''*", "starts with a wildcard"),
    ("glob-empty-quotes-question", "tar cf a.tar ''?", "starts with a wildcard"),
    ("glob-empty-quotes-bracket", "python3 ''[-]c", "starts with a wildcard"),
    ("glob-escaped-empty-mix", "sed -n p ''\"\"*x", "starts with a wildcard"),
    ("sed-in-place-suffix-dir", "sed '-i/var/tmp/*' p f", "another directory"),
    ("sed-in-place-cluster-suffix", "sed -ni../x p f", "another directory"),
    ("sed-in-place-long-suffix", "sed '--in-place=/var/tmp/*' p f", "another directory"),
    ("sed-in-place-prefix-suffix", "sed --in=/tmp/x/ p f", "another directory"),
    ("chmod-equals-octal", "chmod =4755 x", "setuid"),
    ("chmod-plus-octal", "chmod +6000 x", "setuid and setgid"),
    ("chmod-option-mode", "chmod -w,u+s x", "setuid"),
    ("chmod-option-mode-after", "chmod x -w,g+s", "setgid"),
    ("chmod-unreadable", "chmod u+q x", "not a file mode"),
    ("chmod-reference", "chmod --reference=x y", "--reference"),
    ("mkdir-mode-setuid", "mkdir -m 4777 d", "setuid"),
    ("mkdir-mode-cluster", "mkdir -pm2755 d", "setgid"),
    ("mkdir-mode-long", "mkdir --mode=o+t d", "sticky"),
    ("mkdir-mode-long-prefix", "mkdir --mo u+s d", "setuid"),
    ("cd-oldpwd", "cd - && rm -rf etc", "`cd -`"),
    ("cd-option-home", "cd sub && cd -P && rm -r ../x", "cd -P"),
    ("cd-glob", "cd .? && rm -r ../x", "glob"),
    ("tar-extract", "tar -xf a.tar", "tar -xf"),
    ("tar-extract-bundled", "tar xzf a.tgz", "symbolic link"),
    ("tar-extract-long", "tar --extract -f a.tar", "--extract"),
    ("tar-extract-get-prefix", "tar --ge -f a.tar", "--get"),
    ("cp-symlink", "cp -s /home/berth/a l", "cp -s"),
]
ALLOWED = [
    "ls -la /",
    "ls",
    "echo hello && uname -a",
    "true",
    "pwd",
    "cat notes.txt",
    "head -n 2 notes.txt",
    "tail -n 1 notes.txt",
    "wc -l notes.txt",
    "sort notes.txt | uniq -c",
    "grep -n beta notes.txt",
    "cut -d ' ' -f 1 notes.txt",
    "tr a-z A-Z < notes.txt",
    "sed 's/alpha/ALPHA/; 2d' notes.txt",
    "sed -n '/beta/p' notes.txt",
    "echo kept > f.txt",
    "echo run >> runs.txt; wc -l < runs.txt",
    "printf '%s\\n' one two > two.txt",
    "mkdir -p src/pkg && touch src/pkg/a.py",
    "cp notes.txt copy.txt && mv copy.txt moved.txt && rm moved.txt",
    "ls missing 2> /dev/null || echo absent",
    "ls 2>&1 | head -n 3",
    "seq 1 5 | tail -n 2",
    "date +%s",
    "whoami; id -u",
    "find . -name '*.txt' -type f",
    "diff notes.txt notes.txt",
    "echo x | tee t.txt",
    "chmod 755 notes.txt",
    "tar -czf a.tgz notes.txt && tar tzf a.tgz",
    "gzip -k notes.txt && gunzip -c notes.txt.gz",
    "test -f notes.txt && echo yes",
    "[ -f notes.txt ] && echo yes",
    "basename /a/b/c.txt; dirname /a/b/c.txt",
    "stat -c %s notes.txt",
    "du -s . && df -h .",
    "ps -o pid= -p 1",
    "env",
    "which ls",
    "sleep 0.1",
    "echo 'costs $5 `literal`' # a comment; rm -rf /",
    'echo "double quoted, no expansion"',
    "printf 'print(21 * 2)\\n' > s.py; python3 s.py",
    "python3 -m py_compile s.py",
    "echo '{\"a\": 1}' > j.json && python3 -m json.tool j.json",
    "cd src && ls && cd pkg && ls",
    "sed -n -e '/alpha/b end' -e p -e ':end' notes.txt",
    "sed --expression=p --quiet notes.txt",
    "chmod -- 0755 notes.txt",
    "rm -f -- ./-x",
    "ls ./*.txt",
    "grep -rn alpha .\nwc -c notes.txt",
    "find -- . -name '*.txt'",
    "sed -i.bak s/alpha/ALPHA/ notes.txt && sed --in-place=.b2 s/a/b/ notes.txt.bak",
    "sed -i'old_*' s/x/y/ notes.txt",
    "chmod -w,u+x notes.txt && chmod u+w notes.txt",
    "chmod a-s,go=u-w,+X notes.txt && chmod 0644 notes.txt",
    "mkdir -m 750 d1 && mkdir -pm u=rwx,go= d2/e",
    "tar -tzf a.tgz notes.txt",
]


def test_the_corpus_is_large_and_distinct() -> None:
    assert len({command for _, command, _ in BYPASSES}) == len(BYPASSES) >= 60
    assert len({name for name, _, _ in BYPASSES}) == len(BYPASSES)
    assert len(set(ALLOWED)) == len(ALLOWED) >= 25


@pytest.mark.parametrize(
    ("command", "named"), [(c, n) for _, c, n in BYPASSES], ids=[i for i, _, _ in BYPASSES]
)
def test_a_bypass_is_refused_with_a_reason(command: str, named: str) -> None:
    cwd = "/etc" if command in ("rm -r passwd", "cat a.tar | tar x") else None  # judged too
    verdict = judge(command, POLICY, cwd=cwd)
    assert not verdict.allowed
    assert named in verdict.reason, verdict.reason


@pytest.mark.parametrize("command", ALLOWED)
def test_an_allowed_command_is_allowed(command: str) -> None:
    verdict = judge(command, POLICY)
    assert verdict.allowed, verdict.reason


def test_edge_words_get_a_verdict_not_an_exception() -> None:
    assert judge("echo \u00b2>x", POLICY).allowed  # `²` is a word, not a file descriptor
    assert judge("git --version", POLICY).allowed
    assert judge("git status --short", POLICY).allowed
    assert judge("python3 -m venv .venv", POLICY).allowed
    assert "`/etc`" in judge("ls", POLICY, cwd="/etc").reason


def test_the_template_home_is_the_step_users_workspace() -> None:
    assert POLICY.home == WORKSPACE == CommandPolicy(programs={}).home
    assert WORKSPACE in POLICY.workspace


def test_a_tilde_expands_where_bash_expands_it() -> None:
    """At a word's start, and after the first `=` and each `:` of an assignment-shaped word
    (which bash expands even as an argument)."""
    (command,) = parse("echo ~ a=~/x b+=x:~ 1a=~ a=b=~ x:~ '~' a=''~")[0].commands
    home = "\0HOME\0"
    texts = [w.text for w in command.words[1:]]
    assert texts == [home, f"a={home}/x", f"b+=x:{home}", "1a=~", "a=b=~", "x:~", "~", "a=~"]
    assert "another user's home" in judge("echo a=~root", POLICY).reason


def workspace_policy(workspace: Path) -> CommandPolicy:
    """The default policy with a test's temporary directory as the guest's home."""
    return POLICY.model_copy(update={"home": str(workspace), "workspace": [str(workspace)]})


async def test_allowed_commands_run_in_the_guest_terminal(tmp_path: Path) -> None:
    policy = workspace_policy(tmp_path)
    (tmp_path / "notes.txt").write_text("alpha one\nbeta two\ngamma three\n")
    (tmp_path / "src").mkdir()
    failures = []
    for n, command in enumerate(ALLOWED):
        assert judge(command, policy).allowed, command
        execution = Execution(f"e{n}", timeout_s=30)
        code, _ = await run_command(execution, command, str(tmp_path))
        if code != 0:
            failures.append(f"{command!r} exited {code}: {execution.output()}")
    assert not failures
    assert (tmp_path / "f.txt").read_text() == "kept\n"
    assert (tmp_path / "src" / "pkg" / "a.py").exists()


def test_a_policy_file_replaces_the_templates(tmp_path: Path) -> None:
    strict = tmp_path / "strict.toml"
    strict.write_text("allow_chaining = false\n[programs.ls]\n[programs.echo]\nmax_args = 1\n")
    policy = load_policy("default", strict)
    assert judge("ls -la", policy).allowed
    assert "not an allowed program" in judge("cat x", policy).reason
    assert "chaining" in judge("ls; ls", policy).reason
    assert "at most 1 arguments" in judge("echo a b", policy).reason
    assert judge("ls | ls", policy).allowed  # pipes stay allowed unless the file says not


async def test_run_step_refuses_before_the_guest_sees_the_command(
    sqlite_engine: Engine, tmp_path: Path
) -> None:
    engine = sqlite_engine
    async with guest_link(tmp_path) as link:
        activities = link_activities(link.gateway, engine, tmp_path)
        request = step_request(engine, link.sandbox_id, 'python3 -c \'open("pwned", "w")\'')
        with pytest.raises(ApplicationError) as caught:
            await ActivityEnvironment().run(activities.run_step, request)
        assert caught.value.type == "CommandRefused" and caught.value.non_retryable
        assert "python3 -c" in caught.value.message
        await asyncio.sleep(0.2)
        assert link.agent.executions == {} and not (tmp_path / "pwned").exists()
        with Session(engine) as db:
            kinds = [e.type for e in events.read_after(db, request.sandbox.session_id, 0)]
        assert EventType.step_started not in kinds and EventType.step_finished not in kinds
        # The same activity still runs what the policy allows.
        allowed = request.model_copy(update={"step": TerminalStep(command="echo fine")})
        outcome = await ActivityEnvironment().run(activities.run_step, allowed)
        assert outcome.ok and len(link.agent.executions) == 1
