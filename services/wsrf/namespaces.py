"""The namespaces of WS-Addressing, WS-ResourceProperties, WS-ResourceLifetime and
WS-BaseNotification as vmgrid's WSDL uses them, and a prefix map for XPath."""
from __future__ import annotations

WSA = "http://www.w3.org/2005/08/addressing"
RP = "http://docs.oasis-open.org/wsrf/rp-2"
RL = "http://docs.oasis-open.org/wsrf/rl-2"
WSNT = "http://docs.oasis-open.org/wsn/b-2"
XSI = "http://www.w3.org/2001/XMLSchema-instance"

NS = {"wsa": WSA, "wsrf-rp": RP, "wsrf-rl": RL, "wsnt": WSNT}

IS_REFERENCE_PARAMETER = f"{{{WSA}}}IsReferenceParameter"
XPATH_DIALECT = "http://www.w3.org/TR/1999/REC-xpath-19991116"
TOPIC_SIMPLE = "http://docs.oasis-open.org/wsn/t-1/TopicExpression/Simple"
NOTIFY_ACTION = "http://docs.oasis-open.org/wsn/bw-2/NotificationConsumer/Notify"
ANONYMOUS = f"{WSA}/anonymous"
