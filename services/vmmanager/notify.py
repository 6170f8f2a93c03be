"""WS-BaseNotification producer: signed Notify messages about an instance's state changes, sent to
the consumers that subscribed, from a background thread (a slow consumer never holds up a VM)."""
from __future__ import annotations

import logging
import queue
import threading
from datetime import datetime, timezone

import requests
from lxml import etree

from security.tls import grid_session
from security.wssec import sign_envelope
from services.container.soap import envelope

log = logging.getLogger("vmgrid.vmmanager.notify")
WSNT = "http://docs.oasis-open.org/wsn/b-2"
WSA = "http://www.w3.org/2005/08/addressing"
VMM = "http://vmgrid.org/ns/vmmanager/1"
TOPIC_DIALECT = "http://docs.oasis-open.org/wsn/t-1/TopicExpression/Simple"
NOTIFY_ACTION = "http://docs.oasis-open.org/wsn/bw-2/NotificationConsumer/Notify"


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def notify_envelope(consumer: str, producer: str, key: str, identifier: str, old: str, new: str,
                    when: float) -> etree._Element:
    nsmap = {"wsnt": WSNT, "wsa": WSA, "vmm": VMM}
    notify = etree.Element(f"{{{WSNT}}}Notify", nsmap=nsmap)
    holder = etree.SubElement(notify, f"{{{WSNT}}}NotificationMessage")
    topic = etree.SubElement(holder, f"{{{WSNT}}}Topic", Dialect=TOPIC_DIALECT)
    topic.text = "vmm:StateChange"
    prod = etree.SubElement(holder, f"{{{WSNT}}}ProducerReference")
    etree.SubElement(prod, f"{{{WSA}}}Address").text = producer
    params = etree.SubElement(prod, f"{{{WSA}}}ReferenceParameters")
    etree.SubElement(params, f"{{{VMM}}}InstanceKey").text = key
    message = etree.SubElement(holder, f"{{{WSNT}}}Message")
    change = etree.SubElement(message, f"{{{VMM}}}StateChangeNotification")
    etree.SubElement(change, f"{{{VMM}}}InstanceKey").text = key
    etree.SubElement(change, f"{{{VMM}}}Identifier").text = identifier
    etree.SubElement(change, f"{{{VMM}}}oldState").text = old
    etree.SubElement(change, f"{{{VMM}}}newState").text = new
    etree.SubElement(change, f"{{{VMM}}}time").text = utc(when)
    headers = []
    for name, value in (("To", consumer), ("Action", NOTIFY_ACTION)):
        h = etree.Element(f"{{{WSA}}}{name}", nsmap={"wsa": WSA})
        h.text = value
        headers.append(h)
    return envelope(notify, headers)


class Notifier:
    """Queues notifications and sends them signed with the host credential."""

    def __init__(self, credential, trust, *, timeout: float = 10.0):
        self.credential = credential
        self.trust = trust
        self.timeout = timeout
        self.queue: queue.Queue = queue.Queue()
        self.sent = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="vmgrid-notifier", daemon=True)
        self._thread.start()

    def send(self, consumer: str, env: etree._Element) -> None:
        self.queue.put((consumer, env))

    def _run(self) -> None:
        https = grid_session(self.trust.cert_dir)
        plain = requests.Session()
        plain.trust_env = False
        while True:
            consumer, env = self.queue.get()
            if consumer is None:
                https.close()
                plain.close()
                return
            try:
                data = sign_envelope(env, self.credential)
                session = https if consumer.startswith("https:") else plain
                resp = session.post(consumer, data=data, timeout=self.timeout,
                                    headers={"Content-Type": "text/xml; charset=utf-8",
                                             "SOAPAction": f'"{NOTIFY_ACTION}"'})
                if resp.status_code >= 300:
                    raise RuntimeError(f"HTTP {resp.status_code}")
                self.sent += 1
            except Exception as exc:  # a consumer that is gone must not stop the others
                self.failed += 1
                log.warning("notification to %s failed: %s", consumer, exc)

    def close(self) -> None:
        self.queue.put((None, None))
