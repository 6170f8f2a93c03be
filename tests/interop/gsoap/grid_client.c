/* A vmgrid client written with gSOAP 2.8 (wsdl2h/soapcpp2 from the served VMRepository and VMManager WSDLs, the
 * wsse plugin): every request signed (BinarySecurityToken, Timestamp, RSA-SHA256 over Body, Timestamp and the
 * InstanceKey header), every answer's signature verified with the grid CA (soap_wsse_verify_auto), its Body
 * required signed and its signer the host. Prints one JSON line per step; exits 1 on a failure.
 *
 *   grid_client REPO_ENDPOINT CERT.pem KEY.pem CAFILE HOST_CN UNKNOWN_IMAGE VMM_ENDPOINT IMAGE [PKIPATH.der]
 *
 * With PKIPATH.der (a proxy's chain as an X509PKIPathv1, DER) the token is that chain, and KEY.pem is the proxy's
 * key: the wsse plugin's generic soap_wsse_add_BinarySecurityToken and ..._SecurityTokenReferenceURI, as the
 * plugin's X509 helpers send one certificate only. The instance's identifier is $IDENTIFIER (gsoap-1).
 */
#include "soapH.h"
#include "VMRepositorySoapBinding.nsmap"
#include "wsseapi.h"
#include "wsaapi.h"
#include <stdlib.h>
#include <openssl/pem.h>
#include <string.h>

static X509 *cert;
static EVP_PKEY *key;
static const char *host_cn;
static int failed;
static unsigned char *pkipath;   /* the chain as an X509PKIPathv1 (DER), or NULL: the certificate alone */
static int pkipath_size;
#define PKIPATH_URI "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-x509-token-profile-1.0#X509PKIPathv1"

/* The soapAction of an operation, given by the test in the environment as ACTION_<operation>. */
static const char *action(const char *op)
{
  char name[128];
  const char *a;
  snprintf(name, sizeof(name), "ACTION_%s", op);
  a = getenv(name);
  return a ? a : "";
}

/* Sign the next request to `to` for operation `op`: WS-Addressing MessageID, To and Action (the wsa plugin), and
   `instance`, the InstanceKey header of an instance operation, all signed with the Body and the Timestamp. */
static void sign(struct soap *soap, const char *to, const char *op, const char *instance)
{
  soap->header = NULL;
  soap_wsse_set_wsu_id(soap, NULL);
  soap_wsa_request(soap, soap_wsa_rand_uuid(soap), to, action(op));
  if (instance)
    soap->header->ns7__InstanceKey = (char *)instance;
  soap_wsse_set_wsu_id(soap, instance ? "wsa5:MessageID wsa5:To wsa5:Action ns7:InstanceKey"
                                      : "wsa5:MessageID wsa5:To wsa5:Action");
  soap_wsse_add_Timestamp(soap, "Time", 300);
  if (pkipath)
  {
    soap_wsse_add_BinarySecurityToken(soap, "X509Token", PKIPATH_URI, pkipath, pkipath_size);
    soap_wsse_add_KeyInfo_SecurityTokenReferenceURI(soap, "#X509Token", PKIPATH_URI);
  }
  else
  {
    soap_wsse_add_BinarySecurityTokenX509(soap, "X509Token", cert);
    soap_wsse_add_KeyInfo_SecurityTokenReferenceX509(soap, "#X509Token");
  }
  /* an ECDSA P-256 key (a proxy made with `vmgrid proxy-init --key-type ec`) signs with ecdsa-sha256 */
  soap_wsse_sign_body(soap, EVP_PKEY_base_id(key) == EVP_PKEY_EC ? SOAP_SMD_SIGN_ECDSA_SHA256 : SOAP_SMD_SIGN_RSA_SHA256,
                      key, 0);
  soap_wsse_verify_auto(soap, SOAP_SMD_NONE, NULL, 0);
}

/* The answer: signed (checked by the plugin while receiving), Body signed, signer certificate = the host. */
static const char *answer_problem(struct soap *soap)
{
  static char name[512];
  X509 *signer;
  int n;
  if (soap_wsse_verify_body(soap))
    return "the Body of the answer is not signed";
  signer = soap_wsse_get_BinarySecurityTokenX509(soap, NULL);
  if (!signer)
    return "no signer certificate in the answer";
  n = X509_NAME_get_text_by_NID(X509_get_subject_name(signer), NID_commonName, name, sizeof(name));
  if (n < 0 || strcmp(name, host_cn))
    return "the answer is not signed by the host called";
  if (soap_wsse_verify_X509(soap, signer))
    return "the signer is not issued by the grid CA";
  return NULL;
}

static void report(struct soap *soap, const char *step, int ok, const char *detail)
{
  if (ok)
    printf("{\"step\": \"%s\", \"ok\": true, \"detail\": \"%s\"}\n", step, detail ? detail : "");
  else
  {
    const char *s = soap->error ? *soap_faultstring(soap) : detail;
    printf("{\"step\": \"%s\", \"ok\": false, \"error\": \"", step);
    for (; s && *s; s++)
      putchar(*s == '"' || *s == '\\' ? '\'' : *s);
    printf("\"}\n");
    failed = 1;
  }
  fflush(stdout);
}

int main(int argc, char **argv)
{
  struct soap *soap;
  FILE *f;
  char buf[64];
  const char *problem;
  if (argc != 9 && argc != 10)
    return 2;
  host_cn = argv[5];
  if (argc == 10)
  {
    f = fopen(argv[9], "rb");
    if (!f)
      return 2;
    pkipath = malloc(65536);
    pkipath_size = (int)fread(pkipath, 1, 65536, f);
    fclose(f);
  }
  f = fopen(argv[2], "r"); cert = PEM_read_X509(f, NULL, NULL, NULL); fclose(f);
  f = fopen(argv[3], "r"); key = PEM_read_PrivateKey(f, NULL, NULL, NULL); fclose(f);
  soap = soap_new1(SOAP_XML_CANONICAL | SOAP_XML_INDENT * 0);
  soap_register_plugin(soap, soap_wsse);
  soap_register_plugin(soap, soap_wsa);
  if (soap_ssl_client_context(soap, SOAP_SSL_DEFAULT, NULL, NULL, argv[4], NULL, NULL))
  {
    soap_print_fault(soap, stderr);
    return 1;
  }

  { /* ListVOs */
    struct _ns2__ListVOs req = {0};
    struct _ns2__ListVOsResponse resp;
    sign(soap, argv[1], "ListVOs", NULL);
    if (soap_call___ns1__ListVOs(soap, argv[1], NULL, &req, &resp) == SOAP_OK && !(problem = answer_problem(soap)))
    {
      snprintf(buf, sizeof(buf), "%d", resp.__sizevo);
      report(soap, "ListVOs", 1, buf);
    }
    else
      report(soap, "ListVOs", 0, problem);
  }

  { /* QueryImages with criteria, word operators */
    struct ns2__CriterionType crit[2];
    struct ns2__CriteriaGroupType group;
    struct ns2__CriteriaType criteria;
    struct _ns2__QueryImages req;
    struct _ns2__QueryImagesResponse resp;
    memset(&req, 0, sizeof(req));
    crit[0].field = "memory"; crit[0].operator_ = ns2__OperatorType__ge; crit[0].value = "64";
    crit[1].field = "distribution"; crit[1].operator_ = ns2__OperatorType__eq; crit[1].value = "debian";
    group.__sizecriterion = 2; group.criterion = crit;
    criteria.__sizegroup = 1; criteria.group = &group;
    req.__union_QueryImages = SOAP_UNION__ns2__union_QueryImages_criteria;
    req.union_QueryImages.criteria = &criteria;
    sign(soap, argv[1], "QueryImages", NULL);
    if (soap_call___ns1__QueryImages(soap, argv[1], NULL, &req, &resp) == SOAP_OK && !(problem = answer_problem(soap)))
    {
      snprintf(buf, sizeof(buf), "%d", resp.__sizeworkspace);
      report(soap, "QueryImages", 1, buf);
    }
    else
      report(soap, "QueryImages", 0, problem);
  }

  { /* a typed fault: GetDescriptor of an unknown image */
    struct _ns2__GetDescriptor req;
    struct _ns2__GetDescriptorResponse resp;
    req.image = argv[6];
    sign(soap, argv[1], "GetDescriptor", NULL);
    if (soap_call___ns1__GetDescriptor(soap, argv[1], NULL, &req, &resp) == SOAP_FAULT
        && soap->fault && soap->fault->detail && soap->fault->detail->ns3__UnknownImageFault)
    {
      if ((problem = answer_problem(soap)))
        report(soap, "UnknownImageFault", 0, problem);
      else
      {
        soap->error = SOAP_OK;
        report(soap, "UnknownImageFault", 1, "UnknownImageFault");
      }
    }
    else
    {
      fprintf(stderr, "error %d fault %p detail %p\n", soap->error, (void*)soap->fault,
              soap->fault ? (void*)soap->fault->detail : NULL);
      if (soap->fault && soap->fault->detail)
        fprintf(stderr, "detail type %d any %s\n", soap->fault->detail->__type,
                soap->fault->detail->__any ? soap->fault->detail->__any : "-");
      report(soap, "UnknownImageFault", 0, "no typed UnknownImageFault");
    }
  }
  { /* Deploy the descriptor the repository gives, then control the instance */
    struct _ns2__GetDescriptor greq;
    struct _ns2__GetDescriptorResponse gresp;
    struct _ns7__Deploy req;
    struct _ns7__DeployResponse resp;
    enum xsd__boolean yes = xsd__boolean__true_;
    char *instance_key = NULL;
    greq.image = argv[8];
    sign(soap, argv[1], "GetDescriptor", NULL);
    if (soap_call___ns1__GetDescriptor(soap, argv[1], NULL, &greq, &gresp) || (problem = answer_problem(soap)))
      report(soap, "GetDescriptor", 0, problem);
    else
      report(soap, "GetDescriptor", 1, "");
    memset(&req, 0, sizeof(req));
    req.ns4__workspace = gresp.ns4__workspace;
    req.identifier = getenv("IDENTIFIER") ? getenv("IDENTIFIER") : "gsoap-1";
    req.lifetime = "600";
    req.wait = &yes;
    sign(soap, argv[7], "Deploy", NULL);
    if (soap_call___ns6__Deploy(soap, argv[7], NULL, &req, &resp) == SOAP_OK && !(problem = answer_problem(soap))
        && resp.Instance && resp.Instance->wsa5__EndpointReference.ReferenceParameters
        && resp.Instance->wsa5__EndpointReference.ReferenceParameters->__size > 0
        && (instance_key = strstr(resp.Instance->wsa5__EndpointReference.ReferenceParameters->__any[0], "inst-")))
    { /* the InstanceKey reference parameter arrives as raw XML: inst- and 32 hex digits */
      instance_key = soap_strdup(soap, instance_key);
      instance_key[37] = '\0';
      report(soap, "Deploy", 1, soap_ns7__StateType2s(soap, resp.Instance->State));
    }
    else
      report(soap, "Deploy", 0, problem ? problem : "no instance in the answer");

    if (instance_key)
    {
      struct _ns5__GetResourcePropertyResponse prop;
      struct ns7__EmptyType empty;
      struct ns7__StateResponseType state;
      struct _ns8__Destroy destroy;
      struct _ns8__DestroyResponse destroyed;
      const char *ops[] = {"Pause", "Resume"};
      int i;
      /* QName content: gSOAP declares ns7 on the Envelope, so the Body reference lists it (PrefixList) */
      sign(soap, argv[7], "GetResourceProperty", instance_key);
      soap_wsse_set_InclusiveNamespaces(soap, "ns7");
      if (soap_call___ns6__GetResourceProperty(soap, argv[7], NULL, "ns7:State", &prop) == SOAP_OK
          && !(problem = answer_problem(soap)) && prop.__size == 1)
        report(soap, "GetResourceProperty", 1, prop.__any[0].text ? prop.__any[0].text : "");
      else
        report(soap, "GetResourceProperty", 0, problem);
      soap_wsse_set_InclusiveNamespaces(soap, NULL);
      for (i = 0; i < 2; i++)
      {
        sign(soap, argv[7], i == 0 ? "Pause" : "Resume", instance_key);
        if ((i == 0 ? soap_call___ns6__Pause(soap, argv[7], NULL, &empty, &state)
                    : soap_call___ns6__Resume(soap, argv[7], NULL, &empty, &state)) == SOAP_OK
            && !(problem = answer_problem(soap)))
          report(soap, ops[i], 1, soap_ns7__StateType2s(soap, state.State));
        else
          report(soap, ops[i], 0, problem);
      }
      sign(soap, argv[7], "Destroy", instance_key);
      if (soap_call___ns6__Destroy(soap, argv[7], NULL, &destroy, &destroyed) == SOAP_OK && !(problem = answer_problem(soap)))
        report(soap, "Destroy", 1, "");
      else
        report(soap, "Destroy", 0, problem);
    }
  }
  soap_destroy(soap);
  soap_end(soap);
  soap_free(soap);
  return failed;
}
