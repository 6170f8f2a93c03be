"""The host job service for the interop tests of wsdl/jobs.wsdl (tests/interop/job_service.py)."""
from tests.interop.job_service import job_service  # noqa: F401  (a fixture)
