// WS-Security for an Apache Axis 1.4 client, written with WSS4J 1.6's message API, as a Java developer of the
// Globus Toolkit 4 era would: Debian's WSS4J 1.6 has no Axis 1 handlers (org.apache.ws.axis.security.WSDoAllSender
// left WSS4J in 1.6), so two small Axis handlers call WSSecHeader, WSSecTimestamp and WSSecSignature to sign each
// request and WSSecurityEngine to verify each answer.
//
// Outgoing: WS-Addressing wsa:To (the endpoint), wsa:Action (the operation's soapAction) and wsa:MessageID; a
// wsu:Timestamp; an X.509 BinarySecurityToken referenced directly, the certificate chain as X509PKIPathv1
// (useSingleCertificate=false, as SoapUI's useSingleCert=false: a proxy needs its chain); RSA-SHA256 (ECDSA-SHA256 with a P-256 key), SHA-256 digests, exclusive c14n; signed parts:
// Body, Timestamp, the WS-Addressing headers and vmm:InstanceKey or job:JobKey when the call carries it. These are the settings
// of the SoapUI project (wsdl/soapui), which tests/interop/test_contract_axis.py compares with the constants below.
//
// Incoming: every answer, faults included, is verified on the bytes received: the signature (WSS4J checks the
// signer's certificate against the grid CA), the Body and Timestamp among the signed elements, and the signer is
// the host called (its CN). An answer that fails is an AxisFault before the stub deserializes it.
package vmgrid.interop;

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.cert.X509Certificate;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Set;
import java.util.UUID;

import javax.xml.namespace.QName;
import javax.xml.parsers.DocumentBuilderFactory;
import javax.xml.transform.OutputKeys;
import javax.xml.transform.Transformer;
import javax.xml.transform.TransformerFactory;
import javax.xml.transform.dom.DOMSource;
import javax.xml.transform.stream.StreamResult;

import org.apache.axis.AxisFault;
import org.apache.axis.Message;
import org.apache.axis.MessageContext;
import org.apache.axis.SOAPPart;
import org.apache.axis.handlers.BasicHandler;
import org.apache.axis.message.SOAPHeaderElement;
import org.apache.ws.security.WSConstants;
import org.apache.ws.security.WSDataRef;
import org.apache.ws.security.WSEncryptionPart;
import org.apache.ws.security.WSSConfig;
import org.apache.ws.security.WSSecurityEngine;
import org.apache.ws.security.WSSecurityEngineResult;
import org.apache.ws.security.components.crypto.Merlin;
import org.apache.ws.security.message.WSSecHeader;
import org.apache.ws.security.message.WSSecSignature;
import org.apache.ws.security.message.WSSecTimestamp;
import org.w3c.dom.Document;
import org.w3c.dom.Element;
import org.w3c.dom.Node;

public final class GridSecurity {
    public static final String SOAP = "http://schemas.xmlsoap.org/soap/envelope/";
    public static final String WSA = "http://www.w3.org/2005/08/addressing";
    public static final String WSU = WSConstants.WSU_NS;
    public static final String VMM = "http://vmgrid.org/ns/vmmanager/1";
    public static final String JOB = "http://vmgrid.org/ns/jobs/1";

    // The outgoing settings: the SoapUI project (wsdl/soapui) has the same, which
    // tests/interop/test_contract_axis.py checks with `java vmgrid.interop.GridSecurity` (main below prints them).
    static final int KEY_IDENTIFIER = WSConstants.BST_DIRECT_REFERENCE;    // a BinarySecurityToken, referenced
    static final String SIGNATURE_ALGORITHM = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256";
    /** With an elliptic-curve key (a P-256 proxy): ECDSA-SHA256 (RFC 4051), as vmgrid signs with one. */
    static final String EC_SIGNATURE_ALGORITHM = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256";
    static final String DIGEST_ALGORITHM = WSConstants.SHA256;
    static final String CANONICALIZATION = WSConstants.C14N_EXCL_OMIT_COMMENTS;
    static final boolean USE_SINGLE_CERTIFICATE = false;   // the certificate chain as X509PKIPathv1 (a proxy needs it)
    static final int TIME_TO_LIVE = 300;
    /** Signed when present: Body and Timestamp always, the WS-Addressing headers, the instance's or the job's key. */
    static final String[][] PARTS = {
        {SOAP, "Body"}, {WSU, "Timestamp"}, {WSA, "To"}, {WSA, "Action"}, {WSA, "MessageID"}, {WSA, "ReplyTo"},
        {VMM, "InstanceKey"}, {JOB, "JobKey"},
    };

    public static void main(String[] args) {
        StringBuilder parts = new StringBuilder();
        for (String[] part : PARTS) {
            parts.append(parts.length() > 0 ? ", " : "").append("[\"").append(part[0]).append("\", \"")
                 .append(part[1]).append("\"]");
        }
        System.out.println("{\"keyIdentifierType\": \"" + KEY_IDENTIFIER + "\", \"signatureAlgorithm\": \""
                           + SIGNATURE_ALGORITHM + "\", \"digestAlgorithm\": \"" + DIGEST_ALGORITHM
                           + "\", \"signatureCanonicalization\": \"" + CANONICALIZATION + "\", \"useSingleCert\": \""
                           + USE_SINGLE_CERTIFICATE + "\", \"timeToLive\": \"" + TIME_TO_LIVE + "\", \"parts\": ["
                           + parts + "]}");
    }

    private final Merlin signing = new Merlin();
    private final Merlin trust = new Merlin();
    private volatile String expectedSigner;
    private final String signatureAlgorithm;

    /** key: PKCS#8 private key; chain: the signing certificate first (a proxy: then the certificates that issued
     *  it); ca: the grid CA; expectedSigner: the CN the answers must be signed by (host/NAME). */
    public GridSecurity(PrivateKey key, X509Certificate[] chain, X509Certificate ca, String expectedSigner)
            throws Exception {
        KeyStore keys = KeyStore.getInstance("JKS");
        keys.load(null, null);
        keys.setKeyEntry("client", key, "changeit".toCharArray(), chain);
        signing.setKeyStore(keys);
        this.signatureAlgorithm = "EC".equals(key.getAlgorithm()) ? EC_SIGNATURE_ALGORITHM : SIGNATURE_ALGORITHM;
        KeyStore anchors = KeyStore.getInstance("JKS");
        anchors.load(null, null);
        anchors.setCertificateEntry("grid-ca", ca);
        trust.setTrustStore(anchors);
        this.expectedSigner = expectedSigner;
    }

    /** The CN the next answers must be signed by. */
    public void expectSigner(String cn) {
        this.expectedSigner = cn;
    }

    public BasicHandler signer() {
        return new BasicHandler() {
            public void invoke(MessageContext mc) throws AxisFault {
                try {
                    sign(mc);
                } catch (AxisFault f) {
                    throw f;
                } catch (Exception e) {
                    throw AxisFault.makeFault(e);
                }
            }
        };
    }

    public BasicHandler verifier() {
        return new BasicHandler() {
            public void invoke(MessageContext mc) throws AxisFault {
                try {
                    verify(mc);
                } catch (AxisFault f) {
                    throw f;
                } catch (Exception e) {
                    throw AxisFault.makeFault(e);
                }
            }
        };
    }

    private void sign(MessageContext mc) throws Exception {
        Message request = mc.getRequestMessage();
        Document doc = request.getSOAPEnvelope().getAsDocument();
        Element envelope = doc.getDocumentElement();
        Element header = child(envelope, SOAP, "Header");
        if (header == null) {
            header = doc.createElementNS(SOAP, envelope.getPrefix() + ":Header");
            envelope.insertBefore(header, envelope.getFirstChild());
        }
        // WS-Addressing: vmgrid refuses a request signed for another endpoint or operation
        addHeader(doc, header, WSA, "wsa:To", mc.getStrProp(MessageContext.TRANS_URL));
        addHeader(doc, header, WSA, "wsa:Action", mc.getSOAPActionURI());
        addHeader(doc, header, WSA, "wsa:MessageID", "urn:uuid:" + UUID.randomUUID());

        WSSConfig config = WSSConfig.getNewInstance();
        WSSecHeader security = new WSSecHeader();
        security.setMustUnderstand(true);
        security.insertSecurityHeader(doc);
        WSSecTimestamp timestamp = new WSSecTimestamp(config);
        timestamp.setTimeToLive(TIME_TO_LIVE);
        timestamp.build(doc, security);

        List<WSEncryptionPart> parts = new ArrayList<WSEncryptionPart>();
        for (String[] part : PARTS) {
            boolean present = part[0].equals(SOAP) || part[0].equals(WSU) || child(header, part[0], part[1]) != null;
            if (present) {
                parts.add(new WSEncryptionPart(part[1], part[0], ""));
            }
        }
        WSSecSignature signature = new WSSecSignature(config);
        signature.setUserInfo("client", "changeit");
        signature.setKeyIdentifierType(KEY_IDENTIFIER);
        signature.setUseSingleCertificate(USE_SINGLE_CERTIFICATE);
        signature.setSignatureAlgorithm(signatureAlgorithm);
        signature.setDigestAlgo(DIGEST_ALGORITHM);
        signature.setSigCanonicalization(CANONICALIZATION);
        signature.setParts(parts);
        signature.build(doc, signing, security);

        // send these bytes as they are (Axis would re-serialize its own tree otherwise)
        ((SOAPPart) request.getSOAPPart()).setCurrentMessage(serialize(doc), SOAPPart.FORM_BYTES);
        if (System.getenv("AXIS_DUMP") != null) {
            System.err.println(new String(serialize(doc), "UTF-8"));
        }
    }

    private void verify(MessageContext mc) throws Exception {
        Message answer = mc.getResponseMessage();
        if (answer == null) {
            return;
        }
        byte[] bytes = answer.getSOAPPartAsBytes();
        DocumentBuilderFactory factory = DocumentBuilderFactory.newInstance();
        factory.setNamespaceAware(true);
        factory.setFeature("http://apache.org/xml/features/disallow-doctype-decl", true);
        Document doc = factory.newDocumentBuilder().parse(new ByteArrayInputStream(bytes));
        List<WSSecurityEngineResult> results;
        try {
            results = new WSSecurityEngine().processSecurityHeader(doc, null, null, trust);
        } catch (Exception e) {
            throw new AxisFault("vmgrid's answer does not verify: " + e.getMessage());
        }
        if (results == null) {
            throw new AxisFault("vmgrid's answer is not signed");
        }
        Element body = child(doc.getDocumentElement(), SOAP, "Body");
        Set<Object> signed = new HashSet<Object>();
        X509Certificate signer = null;
        boolean timestamp = false;
        for (WSSecurityEngineResult r : results) {
            int action = (Integer) r.get(WSSecurityEngineResult.TAG_ACTION);
            if (action == WSConstants.SIGN) {
                signer = (X509Certificate) r.get(WSSecurityEngineResult.TAG_X509_CERTIFICATE);
                @SuppressWarnings("unchecked")
                List<WSDataRef> refs = (List<WSDataRef>) r.get(WSSecurityEngineResult.TAG_DATA_REF_URIS);
                for (WSDataRef ref : refs) {
                    signed.add(ref.getProtectedElement());
                    signed.add(ref.getName());
                }
            } else if (action == WSConstants.TS) {
                timestamp = true;
            }
        }
        if (signer == null) {
            throw new AxisFault("vmgrid's answer carries no signature");
        }
        if (!signed.contains(body)) {
            throw new AxisFault("the Body of vmgrid's answer is not signed");
        }
        if (!timestamp || !signed.contains(new QName(WSU, "Timestamp"))) {
            throw new AxisFault("the Timestamp of vmgrid's answer is missing or not signed");
        }
        String dn = signer.getSubjectX500Principal().getName();
        if (!dn.startsWith("CN=" + expectedSigner + ",")) {
            throw new AxisFault("vmgrid's answer is signed by " + dn + ", not " + expectedSigner);
        }
        // verified: tell Axis's MustUnderstandChecker that the Security header is understood (as WSS4J 1.5's
        // WSDoAllReceiver did)
        for (Object h : answer.getSOAPEnvelope().getHeaders()) {
            SOAPHeaderElement e = (SOAPHeaderElement) h;
            if (WSConstants.WSSE_NS.equals(e.getNamespaceURI()) && "Security".equals(e.getLocalName())) {
                e.setProcessed(true);
            }
        }
        Counters.verified++;
    }

    /** How many answers were verified (the client reports it, so the test knows the handler ran). */
    public static final class Counters {
        public static int verified;
    }

    static Element child(Element parent, String ns, String local) {
        for (Node n = parent.getFirstChild(); n != null; n = n.getNextSibling()) {
            if (n instanceof Element && ns.equals(n.getNamespaceURI()) && local.equals(n.getLocalName())) {
                return (Element) n;
            }
        }
        return null;
    }

    private static void addHeader(Document doc, Element header, String ns, String qname, String text) {
        Element e = doc.createElementNS(ns, qname);
        e.setAttributeNS("http://www.w3.org/2000/xmlns/", "xmlns:" + qname.split(":")[0], ns);
        e.setTextContent(text);
        header.appendChild(e);
    }

    static byte[] serialize(Document doc) throws Exception {
        Transformer t = TransformerFactory.newInstance().newTransformer();
        t.setOutputProperty(OutputKeys.OMIT_XML_DECLARATION, "yes");
        t.setOutputProperty(OutputKeys.ENCODING, "UTF-8");
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        t.transform(new DOMSource(doc), new StreamResult(out));
        return out.toByteArray();
    }
}
