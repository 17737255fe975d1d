"""The whitelisted terminal's command policy: a template's rules (rules), the strict shell
parser (shell), the judge that holds a command line to the rules (judge), the argument checks
(arguments) and the per-program languages (programs). Callers use what is re-exported here.
"""

from sandboxes.policy.judge import PolicyVerdict, judge
from sandboxes.policy.rules import CommandPolicy, ProgramRule, load_policy

__all__ = ["CommandPolicy", "PolicyVerdict", "ProgramRule", "judge", "load_policy"]
