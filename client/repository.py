"""The VMRepository from a scientist's side: the client library lives with the repository
(services.vmrepository.client, a VMManager uses it too); its names are the client's."""
from services.vmrepository.client import NS, QUERY_EXPRESSION, REPO, QueryResult, RepositoryClient

__all__ = ["RepositoryClient", "QueryResult", "NS", "REPO", "QUERY_EXPRESSION"]
