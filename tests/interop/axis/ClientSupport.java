// What the Axis clients (GridClient: VMRepository and VMManager; JobClient: the job service) share: their
// configuration, GridSecurity set up with the client's key and the grid CA (trusted for HTTPS too), the handler chain
// that signs each request and verifies each answer, and the steps, each printed as one JSON line.
package vmgrid.interop;

import java.io.FileInputStream;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.security.KeyFactory;
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import java.security.spec.PKCS8EncodedKeySpec;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;

import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;

import org.apache.axis.AxisFault;
import org.apache.axis.SimpleTargetedChain;
import org.apache.axis.configuration.SimpleProvider;
import org.apache.axis.transport.http.HTTPSender;
import org.apache.axis.transport.http.HTTPTransport;

final class ClientSupport {
    interface Step {
        String run() throws Exception;
    }

    private static boolean failed;
    private static List<String> only;

    private ClientSupport() {
    }

    static boolean failed() {
        return failed;
    }

    /** CONFIG.properties; its steps (optional) are the only steps run. */
    static Properties load(String path) throws Exception {
        Properties config = new Properties();
        try (InputStream in = new FileInputStream(path)) {
            config.load(in);
        }
        if (config.getProperty("steps") != null) {
            only = java.util.Arrays.asList(config.getProperty("steps").split(","));
        }
        return config;
    }

    /** The client's key and chain, the grid CA trusted for HTTPS, and the answers' expected signer. */
    static GridSecurity security(Properties config) throws Exception {
        CertificateFactory x509 = CertificateFactory.getInstance("X.509");
        X509Certificate ca;
        try (InputStream in = new FileInputStream(config.getProperty("ca"))) {
            ca = (X509Certificate) x509.generateCertificate(in);
        }
        List<X509Certificate> chain = new ArrayList<X509Certificate>();
        try (InputStream in = new FileInputStream(config.getProperty("chain"))) {
            for (Object c : x509.generateCertificates(in)) {
                chain.add((X509Certificate) c);
            }
        }
        // an RSA key, or an ECDSA P-256 one (`vmgrid proxy-init --key-type ec`): keyAlgorithm=EC
        PrivateKey key = KeyFactory.getInstance(config.getProperty("keyAlgorithm", "RSA")).generatePrivate(
            new PKCS8EncodedKeySpec(Files.readAllBytes(Paths.get(config.getProperty("key")))));

        // HTTPS: trust the grid CA (Axis's JSSESocketFactory takes the default SSLSocketFactory)
        KeyStore anchors = KeyStore.getInstance("JKS");
        anchors.load(null, null);
        anchors.setCertificateEntry("grid-ca", ca);
        TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(anchors);
        SSLContext tls = SSLContext.getInstance("TLS");
        tls.init(null, tmf.getTrustManagers(), null);
        SSLContext.setDefault(tls);
        return new GridSecurity(key, chain.toArray(new X509Certificate[0]), ca, config.getProperty("hostCN"));
    }

    /** The client's handler chain: sign, send over HTTP(S), verify the answer. */
    static SimpleProvider engine(GridSecurity security) {
        SimpleProvider engine = new SimpleProvider();
        engine.deployTransport(HTTPTransport.DEFAULT_TRANSPORT_NAME,
                               new SimpleTargetedChain(security.signer(), new HTTPSender(), security.verifier()));
        return engine;
    }

    /** Run one call; it counts only if GridSecurity verified exactly one answer for it. */
    static void step(String name, Step step) {
        step(name, step, false);
    }

    /** Run a step; one that polls (polls) makes several calls, each of its answers verified. */
    static void step(String name, Step step, boolean polls) {
        boolean chosen = only != null ? only.contains(name) : !name.equals("OtherHostRefused");
        if (failed || !chosen) {
            return;
        }
        int before = GridSecurity.Counters.verified;
        try {
            String detail = step.run();
            int verified = GridSecurity.Counters.verified - before;
            if (polls ? verified < 1 : verified != 1) {
                throw new Exception(verified + " answers verified");
            }
            System.out.println("{\"step\": " + json(name) + ", \"ok\": true, \"verified\": " + verified
                               + ", \"detail\": " + json(detail) + "}");
        } catch (Exception e) {
            failed = true;
            String type = e.getClass().getName();
            String message = e instanceof AxisFault ? ((AxisFault) e).getFaultString() : e.getMessage();
            System.out.println("{\"step\": " + json(name) + ", \"ok\": false, \"error\": " + json(type + ": " + message)
                               + "}");
            e.printStackTrace();
        }
    }

    static String json(String s) {
        if (s == null) {
            return "null";
        }
        StringBuilder out = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20) {
                out.append(String.format("\\u%04x", (int) c));
            } else {
                out.append(c);
            }
        }
        return out.append('"').toString();
    }
}
