"""Registers ``ContractExample`` (tests/methods/_tiny.py), a method that exists only in the test suite, in ``METHODS``.

The contract tests of ``test_contract.py`` iterate over ``METHODS`` and check it like every real method: adding a
method takes one file and one ``METHODS`` entry (plus, for the command line, a flag group and a glue function in
main_moco.py).
"""

from _tiny import ContractExample

from smallssl.methods import METHODS

METHODS.setdefault("_contract_example", ContractExample)
