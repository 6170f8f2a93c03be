"""Calling a vmgrid grid service from a client: the SOAP client plumbing lives below the services
(services.soapclient, the VMManager calls the repository with it too); its names are the client's."""
from services.soapclient import (ClientError, GridServiceClient, SameOriginTransport, SoapFaultError, Unreachable,
                                 VMGridFault, default_trust, service_url)

__all__ = ["GridServiceClient", "ClientError", "Unreachable", "SoapFaultError", "SameOriginTransport", "VMGridFault",
           "default_trust", "service_url"]
