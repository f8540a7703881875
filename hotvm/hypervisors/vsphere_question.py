"""'Answer the question' (the seed's detectQuestion.pl): a VM stuck on a question blocks every task on it.

A question with exactly one choice (e.g. "OK") is answered at once and logged; one with several choices is a
decision hotvm must not guess, so the step fails with the question and its choices.
"""

from __future__ import annotations

import logging

from pyVmomi import vim

from hotvm.errors import HypervisorError

log = logging.getLogger("hotvm.vsphere")


class QuestionPending(HypervisorError):
    """The VM waits for a multiple-choice answer only a person can give."""


def answer_single_choice(vm: vim.VirtualMachine, vm_name: str) -> str | None:
    """Answer the VM's pending single-choice question; returns its text (None when there is none).

    Raises QuestionPending for a multiple-choice question."""
    question = vm.runtime.question
    if question is None:
        return None
    choices = list(question.choice.choiceInfo or [])
    labels = [c.label or c.summary or c.key for c in choices]
    text = " ".join((question.text or "").split())
    if len(choices) == 1:
        vm.AnswerVM(question.id, choices[0].key)
        log.warning("VM '%s' asked %r; answered with its only choice %r", vm_name, text, labels[0])
        return text
    raise QuestionPending(
        f"VM '{vm_name}' is waiting for an answer to the question {text!r} "
        f"(choices: {', '.join(repr(label) for label in labels)}); hotvm does not guess",
        "answer it in the vSphere Client (VM > Guest OS > Answer Question), then rerun the backup",
    )
