"""
Documents made from the C{mailproxy} command's argument parser, so that
they cannot drift from it: a bash completion script (C{mailproxy completion
bash}) and a manual page in roff (C{mailproxy manpage}).
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterator

from mailproxy import __version__

__all__ = ["commands", "bashCompletion", "manPage"]


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """
    The subcommands of C{parser}: (name, one-line help, parser).
    """
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, subparser in action.choices.items():
                found.append((name, helps.get(name, ""), subparser))
    return found


def commands(parser: argparse.ArgumentParser) -> Iterator[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    """
    Every command of C{parser}, depth first: its path of subcommand names
    (C{()} for the program itself, C{("route", "explain")}), its one-line
    help and its parser.
    """
    pending: list[tuple[tuple[str, ...], str, argparse.ArgumentParser]] = [((), parser.description or "", parser)]
    while pending:
        path, text, current = pending.pop(0)
        yield path, text, current
        pending[0:0] = [(path + (name,), help, sub) for name, help, sub in _subcommands(current)]


def _takesFile(action: argparse.Action) -> bool:
    # The options whose value is a file or a directory: completed as one.
    return action.nargs != 0 and str(action.metavar) in ("FILE", "D")


def bashCompletion(parser: argparse.ArgumentParser) -> str:
    """
    A bash completion script for C{parser}'s program: subcommands, then each
    command's options, and file names after the options that take a file.
    """
    prog = parser.prog
    function = "_" + re.sub(r"\W", "_", prog)
    cases = []
    for path, _, command in commands(parser):
        words = [name for name, _, _ in _subcommands(command)]
        options: list[str] = []
        files: list[str] = []
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.option_strings and action.choices:
                words.extend(str(choice) for choice in action.choices)
            options.extend(action.option_strings)
            if _takesFile(action):
                files.extend(action.option_strings)
        line = "|".join(" ".join(group) for group in (words, options, files))
        pattern = shlex.quote(" ".join(path)) if path else '""'
        cases.append(f"        {pattern}) echo {shlex.quote(line)} ;;")
    return f"""\
# bash completion for {prog} {__version__}; made by `{prog} completion bash`.
# Install: {prog} completion bash > /etc/bash_completion.d/{prog}

{function}_words() {{
    # The subcommands, options and file-taking options of the command $1,
    # separated by |.
    case "$1" in
{chr(10).join(cases)}
    esac
}}

{function}() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    local path="" i commands options files
    for ((i = 1; i < COMP_CWORD; i++)); do
        IFS='|' read -r commands options files <<< "$({function}_words "$path")"
        if [[ " $commands " == *" ${{COMP_WORDS[i]}} "* ]]; then
            path="${{path:+$path }}${{COMP_WORDS[i]}}"
        fi
    done
    IFS='|' read -r commands options files <<< "$({function}_words "$path")"
    if [[ " $files " == *" $prev "* ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
    elif [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$options" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$commands" -- "$cur"))
    fi
}}

complete -o default -F {function} {prog}
"""


def _roff(text: str) -> str:
    """
    C{text} safe in a roff line: backslashes and hyphens escaped, no line
    starting with a control character.
    """
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.MULTILINE)


def manPage(parser: argparse.ArgumentParser) -> str:
    """
    The manual page of C{parser}'s program, section 1, in roff: every
    command with its usage, description and options.
    """
    prog = parser.prog
    lines = [
        f'.TH {prog.upper()} 1 "" "{prog} {__version__}" "User Commands"',
        ".SH NAME",
        f"{prog} \\- {_roff(parser.description or '')}",
        ".SH SYNOPSIS",
        f".B {prog}",
        "COMMAND [OPTIONS]",
        ".SH DESCRIPTION",
        _roff(
            f"{prog} runs and operates a mail proxy. Each command below is also "
            f"described by `{prog} COMMAND --help`."
        ),
        ".SH COMMANDS",
    ]
    for path, text, command in commands(parser):
        if not path or _subcommands(command):
            continue
        lines += [f'.SS "{prog} {_roff(" ".join(path))}"', _roff(text.strip()) + ".", ".PP", ".nf"]
        lines += [_roff(command.format_usage().strip()), ".fi"]
        if command.description:
            lines += [".PP", _roff(command.description)]
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
                continue
            name = ", ".join(action.option_strings) or str(action.metavar or action.dest)
            if action.option_strings and action.nargs != 0:
                name += f" {action.metavar or action.dest.upper()}"
            helpText = (action.help or "") % {"default": action.default, "prog": command.prog}
            lines += [".TP", f"\\fB{_roff(name)}\\fR", _roff(helpText)]
    lines += [
        ".SH FILES",
        ".TP",
        "/etc/mailproxy/mailproxy.toml",
        "The configuration the operations commands read by default.",
        ".SH EXIT STATUS",
        "0 on success, 1 on failure, 2 for wrong usage.",
        ".SH SEE ALSO",
        ".BR twistd (1)",
    ]
    return "\n".join(lines) + "\n"
