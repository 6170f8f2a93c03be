// A vmgrid client written with Apache Axis 1.4 stubs (WSDL2Java from the WSDLs a live grid serves) and WSS4J 1.6
// (GridSecurity: every request signed, every answer verified). Prints one JSON line per step; exits 1 on a failure.
//
//   java vmgrid.interop.GridClient CONFIG.properties
// CONFIG: repoUrl, vmmUrl, key (PKCS#8 DER), chain (PEM: the signing certificate first), ca (PEM), hostCN,
//         image, unknownImage, identifier, steps (optional: the steps to run, comma separated; default all but
//         OtherHostRefused), otherHostCN (for OtherHostRefused), keyAlgorithm (optional: RSA, or EC for a P-256 key)
package vmgrid.interop;

import java.net.URL;
import java.util.Properties;

import javax.xml.namespace.QName;

import org.apache.axis.AxisFault;
import org.apache.axis.client.Stub;
import org.apache.axis.configuration.SimpleProvider;
import org.apache.axis.message.MessageElement;
import org.apache.axis.message.SOAPHeaderElement;
import org.apache.axis.types.PositiveInteger;

import static vmgrid.interop.ClientSupport.engine;
import static vmgrid.interop.ClientSupport.failed;
import static vmgrid.interop.ClientSupport.load;
import static vmgrid.interop.ClientSupport.security;
import static vmgrid.interop.ClientSupport.step;

import vmgrid.faults.InvalidArgumentFault;
import vmgrid.faults.UnknownImageFault;
import vmgrid.repo.CriteriaGroupType;
import vmgrid.repo.CriteriaType;
import vmgrid.repo.CriterionType;
import vmgrid.repo.GetDescriptor;
import vmgrid.repo.ListVOs;
import vmgrid.repo.ListVOsResponseVo;
import vmgrid.repo.OperatorType;
import vmgrid.repo.QueryImages;
import vmgrid.repo.QueryImagesResponse;
import vmgrid.repo.wsdl.VMRepositoryPortType;
import vmgrid.repo.wsdl.VMRepositoryServiceLocator;
import vmgrid.vmm.Deploy;
import vmgrid.vmm.DeployResponse;
import vmgrid.vmm.EmptyType;
import vmgrid.vmm.wsdl.VMManagerPortType;
import vmgrid.vmm.wsdl.VMManagerServiceLocator;
import vmgrid.ws.WorkspaceType;
import vmgrid.wsrf.rl.Destroy;
import vmgrid.wsrf.rp.GetResourcePropertyResponse;

public final class GridClient {
    public static void main(String[] args) throws Exception {
        final Properties config = load(args[0]);
        final GridSecurity security = security(config);
        SimpleProvider engine = engine(security);
        final VMRepositoryPortType repo = new VMRepositoryServiceLocator(engine)
            .getVMRepositoryPort(new URL(config.getProperty("repoUrl")));
        final VMManagerPortType vmm = new VMManagerServiceLocator(engine)
            .getVMManagerPort(new URL(config.getProperty("vmmUrl")));

        step("ListVOs", () -> {
            ListVOsResponseVo[] vos = repo.listVOs(new ListVOs()).getVo();
            for (ListVOsResponseVo vo : vos) {
                if (vo.getName().equals("bio")) {
                    return vo.getImages().toString();
                }
            }
            throw new Exception("no VO bio among " + vos.length);
        });
        step("QueryImages", () -> {
            // word operators: no '<' or '>' in text
            QueryImages query = new QueryImages();
            query.setCriteria(new CriteriaType(new CriteriaGroupType[] {new CriteriaGroupType(new CriterionType[] {
                new CriterionType("memory", OperatorType.fromValue("ge"), "64"),
                new CriterionType("distribution", OperatorType.fromValue("eq"), "debian"),
            })}));
            QueryImagesResponse answer = repo.queryImages(query);
            WorkspaceType[] found = answer.getWorkspace();
            return String.valueOf(found == null ? 0 : found.length);
        });
        step("UnknownImageFault", () -> {
            try {
                repo.getDescriptor(new GetDescriptor(config.getProperty("unknownImage")));
            } catch (UnknownImageFault f) {      // typed: the fault declared in the WSDL, not a plain AxisFault
                return f.getImage();
            }
            throw new Exception("GetDescriptor of an unknown image answered without UnknownImageFault");
        });
        step("OtherHostRefused", () -> {
            // the verifier refuses an answer signed by another host than the one expected
            security.expectSigner(config.getProperty("otherHostCN"));
            try {
                repo.listVOs(new ListVOs());
            } catch (AxisFault f) {
                if (f.getFaultString().contains("not " + config.getProperty("otherHostCN"))) {
                    GridSecurity.Counters.verified++;      // this step's one answer: checked, and refused
                    return f.getFaultString();
                }
                throw f;
            } finally {
                security.expectSigner(config.getProperty("hostCN"));
            }
            throw new Exception("an answer signed by " + config.getProperty("hostCN") + " was accepted as "
                                + config.getProperty("otherHostCN") + "'s");
        });
        step("InvalidArgumentFault", () -> {
            QueryImages query = new QueryImages();
            query.setCriteria(new CriteriaType(new CriteriaGroupType[] {new CriteriaGroupType(new CriterionType[] {
                new CriterionType("memory", OperatorType.fromValue("ge"), "64")})}));
            query.setLimit(new PositiveInteger("5000"));       // the schema's maxInclusive is 1000
            try {
                repo.queryImages(query);
            } catch (InvalidArgumentFault f) {
                return f.getDescription();
            }
            throw new Exception("a QueryImages the schema refuses answered without InvalidArgumentFault");
        });
        final WorkspaceType[] descriptor = new WorkspaceType[1];
        step("GetDescriptor", () -> {
            descriptor[0] = repo.getDescriptor(new GetDescriptor(config.getProperty("image"))).getWorkspace();
            return descriptor[0].getIdentity().getName();
        });
        final String[] instanceKey = new String[1];
        step("Deploy", () -> {
            Deploy deploy = new Deploy();
            deploy.setWorkspace(descriptor[0]);
            deploy.setIdentifier(config.getProperty("identifier"));
            deploy.setLifetime(new PositiveInteger("600"));
            deploy.setWait(Boolean.TRUE);
            DeployResponse answer = vmm.deploy(deploy);
            for (MessageElement e : answer.getInstance().getEndpointReference().getReferenceParameters().get_any()) {
                if (e.getLocalName().equals("InstanceKey")) {
                    instanceKey[0] = e.getValue();
                }
            }
            if (instanceKey[0] == null) {
                throw new Exception("no InstanceKey in the instance's EndpointReference");
            }
            return answer.getInstance().getState().getValue() + "\n" + answer.getInstance().getOwner();
        });
        // instance operations carry the InstanceKey header; GridSecurity signs it
        if (instanceKey[0] != null) {
            SOAPHeaderElement header = new SOAPHeaderElement(GridSecurity.VMM, "InstanceKey");
            header.addTextNode(instanceKey[0]);
            ((Stub) vmm).setHeader(header);
        }
        step("GetResourceProperty", () -> {
            GetResourcePropertyResponse answer = vmm.getResourceProperty(new QName(GridSecurity.VMM, "State"));
            return answer.get_any()[0].getValue();
        });
        step("Pause", () -> vmm.pause(new EmptyType()).getState().getValue());
        step("Resume", () -> vmm.resume(new EmptyType()).getState().getValue());
        step("Destroy", () -> {
            vmm.destroy(new Destroy());
            return "destroyed";
        });
        System.exit(failed() ? 1 : 0);
    }
}
