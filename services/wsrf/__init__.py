"""The WS-Resource framework every vmgrid service builds its resources on (GT4 Java WS Core's shape,
the subset vmgrid's WSDL declares). Nothing here knows a particular service.

Modules, lowest first (the API is stable: the VMManager and the job service build on it):

- :mod:`services.wsrf.namespaces` -- the WS-Addressing, WSRF and WS-BaseNotification namespaces and
  ``NS`` (prefix map for XPath).
- :mod:`services.wsrf.epr` -- :class:`EndpointReference` (address + reference parameters), read from and
  written to ``wsa:EndpointReference``-typed elements; the reference-parameter headers a client sends.
- :mod:`services.wsrf.resource` -- :class:`ResourceHome` (find a resource by the key its EPR carries,
  raising ``ResourceUnknown``) and :func:`resource_key` (the key from a request's SOAP headers).
- :mod:`services.wsrf.properties` -- :class:`ResourceProperty` (one class per property: its QName, how a
  resource renders it, how a client reads it back) and :class:`PropertySet`, which answers
  GetResourceProperty, GetMultipleResourceProperties and QueryResourceProperties for any resource.
- :mod:`services.wsrf.lifetime` -- scheduled termination: the ``TerminationTime`` / ``CurrentTime``
  properties, SetTerminationTime parsed and answered, and :class:`Sweeper` (a thread that destroys what
  expired).
- :mod:`services.wsrf.notification` -- WS-BaseNotification: Subscribe parsed and answered, subscription
  records (:class:`Subscriptions`, SQLite), Notify messages, and :class:`Notifier` (signed, time-bounded
  delivery to consumers a :class:`ConsumerPolicy` allows).

xs:dateTime and xs:duration: :mod:`services.common.xsdtime` (below every layer, faults use it too).
"""
