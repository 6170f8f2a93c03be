// A client of vmgrid's job service written with Apache Axis 1.4 stubs (WSDL2Java from the jobs.wsdl a live container
// serves) and WSS4J 1.6 (GridSecurity: every request signed, the job:JobKey header with it; every answer verified).
// Runs the steps of tests/interop/job_service.py (JOB_STEPS); prints one JSON line per step; exits 1 on a failure.
//
//   java vmgrid.interop.JobClient CONFIG.properties
// CONFIG: jobsUrl, key (PKCS#8 DER), chain (PEM: the signing certificate first), ca (PEM), hostCN, unknownKey,
//         echo and long (the two jobs' words, separated by |), keyAlgorithm (optional: RSA, or EC for a P-256 key)
package vmgrid.interop;

import java.net.URL;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;

import javax.xml.namespace.QName;

import org.apache.axis.client.Stub;
import org.apache.axis.message.MessageElement;
import org.apache.axis.message.SOAPHeaderElement;
import org.apache.axis.types.PositiveInteger;

import static vmgrid.interop.ClientSupport.engine;
import static vmgrid.interop.ClientSupport.failed;
import static vmgrid.interop.ClientSupport.load;
import static vmgrid.interop.ClientSupport.security;
import static vmgrid.interop.ClientSupport.step;

import vmgrid.faults.IllegalTransitionFault;
import vmgrid.faults.InvalidArgumentFault;
import vmgrid.faults.ResourceUnknownFault;
import vmgrid.jobs.Cancel;
import vmgrid.jobs.JobType;
import vmgrid.jobs.ListJobs;
import vmgrid.jobs.SubmitJob;
import vmgrid.jobs.SubmitJobResponse;
import vmgrid.jobs.wsdl.JobServiceLocator;
import vmgrid.jobs.wsdl.JobsPortType;
import vmgrid.wsrf.rl.Destroy;

public final class JobClient {
    private static JobsPortType jobs;

    public static void main(String[] args) throws Exception {
        final Properties config = load(args[0]);
        jobs = new JobServiceLocator(engine(security(config))).getJobsPort(new URL(config.getProperty("jobsUrl")));

        final String[] done = new String[1];
        step("SubmitJob", () -> done[0] = submit(config.getProperty("echo").split("\\|")));
        step("State", () -> until(done[0], "Done"), true);
        step("ListJobs", () -> {
            ListJobs list = new ListJobs();
            list.setIncludeEnded(Boolean.TRUE);
            JobType[] listed = port(null).listJobs(list).getJob();
            for (JobType job : listed == null ? new JobType[0] : listed) {
                if (done[0].equals(jobKey(job))) {
                    return job.getState().getValue() + " " + job.getExitCode();
                }
            }
            throw new Exception(done[0] + " is not among the " + (listed == null ? 0 : listed.length) + " jobs listed");
        });
        step("Outputs", () -> {
            StringBuilder out = new StringBuilder();
            for (MessageElement file : children(property(done[0], "Outputs")[0], "file")) {
                out.append(out.length() > 0 ? ";" : "").append(text(file, "name")).append(' ')
                   .append(text(file, "size")).append(' ').append(text(file, "sha256"));
            }
            return out.toString();
        });
        step("CancelRequestedAfterEnd", () -> optional(property(done[0], "CancelRequested")));
        step("ResourceBounds", () -> {
            MessageElement[] bounds = property(done[0], "ResourceBounds");
            if (bounds.length == 0) {
                return "absent";
            }
            return (bounds[0].getChildren() == null ? 0 : children(bounds[0], "event").size()) + " events";
        });
        final String[] running = new String[1];
        step("SubmitLongJob", () -> {
            running[0] = submit(config.getProperty("long").split("\\|"));
            until(running[0], "Active");
            return running[0];
        }, true);
        step("Cancel", () -> port(running[0]).cancel(new Cancel()).getState().getValue());
        step("CancelRequested", () -> optional(property(running[0], "CancelRequested")));
        step("Cancelled", () -> until(running[0], "Cancelled"), true);
        step("IllegalTransitionFault", () -> {
            try {
                port(running[0]).cancel(new Cancel());
            } catch (IllegalTransitionFault f) {    // typed: the fault the WSDL declares, not a plain AxisFault
                return "IllegalTransitionFault";
            }
            throw new Exception("Cancel of a Cancelled job answered without IllegalTransitionFault");
        });
        step("Destroy", () -> {
            port(done[0]).destroy(new Destroy());
            return "destroyed";
        });
        step("DestroyLong", () -> {
            port(running[0]).destroy(new Destroy());
            return "destroyed";
        });
        step("ResourceUnknownFault", () -> {
            try {
                property(config.getProperty("unknownKey"), "State");
            } catch (ResourceUnknownFault f) {
                return "ResourceUnknownFault";
            }
            throw new Exception("a property of an unknown job answered without ResourceUnknownFault");
        });
        step("InvalidArgumentFault", () -> {
            try {
                submit(new String[] {""});          // the schema's executable is a non-empty string
            } catch (InvalidArgumentFault f) {
                return "InvalidArgumentFault";
            }
            throw new Exception("a SubmitJob the schema refuses answered without InvalidArgumentFault");
        });
        System.exit(failed() ? 1 : 0);
    }

    /** SubmitJob of these words (a lifetime of 600 s); the job's key, from its EndpointReference. */
    private static String submit(String[] words) throws Exception {
        SubmitJob job = new SubmitJob();
        job.setExecutable(words[0]);
        String[] rest = new String[words.length - 1];
        System.arraycopy(words, 1, rest, 0, rest.length);
        job.setArgument(rest);
        job.setLifetime(new PositiveInteger("600"));
        SubmitJobResponse answer = port(null).submitJob(job);
        String jobKey = jobKey(answer.getJob());
        if (jobKey == null) {
            throw new Exception("no JobKey in the job's EndpointReference (state " + answer.getJob().getState() + ")");
        }
        return jobKey;
    }

    /** The JobKey reference parameter of a job's EndpointReference. */
    private static String jobKey(JobType job) {
        for (MessageElement e : job.getEndpointReference().getReferenceParameters().get_any()) {
            if (e.getLocalName().equals("JobKey") && GridSecurity.JOB.equals(e.getNamespaceURI())) {
                return e.getValue();
            }
        }
        return null;
    }

    /** The port, its requests carrying this job's JobKey header (GridSecurity signs it), or none. */
    private static JobsPortType port(String jobKey) throws Exception {
        ((Stub) jobs).clearHeaders();
        if (jobKey != null) {
            SOAPHeaderElement header = new SOAPHeaderElement(GridSecurity.JOB, "JobKey");
            header.addTextNode(jobKey);
            ((Stub) jobs).setHeader(header);
        }
        return jobs;
    }

    /** GetResourceProperty job:NAME: the property's elements (none when the job has no such value). */
    private static MessageElement[] property(String jobKey, String name) throws Exception {
        MessageElement[] any = port(jobKey).getResourceProperty(new QName(GridSecurity.JOB, name)).get_any();
        return any == null ? new MessageElement[0] : any;
    }

    private static String optional(MessageElement[] property) {
        return property.length == 0 ? "absent" : property[0].getValue();
    }

    /** Poll State until it is `wanted` or final. */
    private static String until(String jobKey, String wanted) throws Exception {
        String state = null;
        for (int i = 0; i < 600; i++) {
            state = property(jobKey, "State")[0].getValue();
            if (state.equals(wanted) || state.equals("Done") || state.equals("Failed") || state.equals("Cancelled")) {
                break;
            }
            Thread.sleep(100);
        }
        return state;
    }

    private static List<MessageElement> children(MessageElement parent, String local) {
        List<MessageElement> out = new ArrayList<MessageElement>();
        for (Object child : parent.getChildren()) {
            if (child instanceof MessageElement && local.equals(((MessageElement) child).getLocalName())) {
                out.add((MessageElement) child);
            }
        }
        return out;
    }

    private static String text(MessageElement parent, String local) {
        List<MessageElement> found = children(parent, local);
        return found.isEmpty() ? null : found.get(0).getValue();
    }
}
