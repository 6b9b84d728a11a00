"""Acceptance suites that take a factory, as containerd's ``testsuite`` packages do.

A suite is a class of tests that talks only to a public contract; a test
module binds it by subclassing it and providing the factory fixture the
suite names. The same checks then run against the local stores, through
ckfsd's gRPC services, and against any later implementation, so no face of
ckfs can drift from the contract without a test failing.
"""
