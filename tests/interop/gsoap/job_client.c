/* A client of vmgrid's job service written with gSOAP 2.8 (wsdl2h/soapcpp2 from the served jobs.wsdl, prefixes
 * fixed by a typemap: job, jobw, f, rp, rl), signing as grid_client.c does (BinarySecurityToken, Timestamp,
 * RSA-SHA256 or ECDSA-SHA256 over Body, Timestamp, the WS-Addressing headers and the job:JobKey header), every
 * answer's signature verified with the grid CA, its Body required signed and its signer the host. Runs the steps of
 * tests/interop/job_service.py (JOB_STEPS; echo and sleeper below are its ECHO and LONG).
 * Prints one JSON line per step; exits 1 on a failure.
 *
 *   job_client JOB_ENDPOINT CERT.pem KEY.pem CAFILE HOST_CN UNKNOWN_JOB_KEY [PKIPATH.der]
 */
#include "soapH.h"
#include "JobsSoapBinding.nsmap"
#include "wsseapi.h"
#include "wsaapi.h"
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <openssl/pem.h>

static X509 *cert;
static EVP_PKEY *key;
static const char *host_cn, *url;
static int failed;
static unsigned char *pkipath;
static int pkipath_size;
#define PKIPATH_URI "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-x509-token-profile-1.0#X509PKIPathv1"

static const char *action(const char *op)
{
  char name[128];
  const char *a;
  snprintf(name, sizeof(name), "ACTION_%s", op);
  a = getenv(name);
  return a ? a : "";
}

/* Sign the next request for `op`; `job` is the JobKey header of a job's operation (signed too), or NULL. */
static void sign(struct soap *soap, const char *op, const char *job)
{
  soap->header = NULL;
  soap_wsse_set_wsu_id(soap, NULL);
  soap_wsa_request(soap, soap_wsa_rand_uuid(soap), url, action(op));
  if (job)
    soap->header->job__JobKey = (char *)job;
  soap_wsse_set_wsu_id(soap, job ? "wsa5:MessageID wsa5:To wsa5:Action job:JobKey" : "wsa5:MessageID wsa5:To wsa5:Action");
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
  soap_wsse_sign_body(soap, EVP_PKEY_base_id(key) == EVP_PKEY_EC ? SOAP_SMD_SIGN_ECDSA_SHA256 : SOAP_SMD_SIGN_RSA_SHA256,
                      key, 0);
  soap_wsse_verify_auto(soap, SOAP_SMD_NONE, NULL, 0);
}

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
  const char *s = ok ? detail : soap->error ? *soap_faultstring(soap) : detail;
  printf("{\"step\": \"%s\", \"ok\": %s, \"%s\": \"", step, ok ? "true" : "false", ok ? "detail" : "error");
  for (; s && *s; s++)
    putchar(*s == '"' || *s == '\\' ? '\'' : *s);
  printf("\"}\n");
  fflush(stdout);
  if (!ok)
    failed = 1;
}

static const char *local(const char *name)
{
  const char *colon = name ? strchr(name, ':') : NULL;
  return colon ? colon + 1 : name;
}

/* The DOM child of `el` named `name` (any prefix), or NULL. */
static struct soap_dom_element *child(struct soap_dom_element *el, const char *name)
{
  struct soap_dom_element *c;
  for (c = el ? el->elts : NULL; c; c = c->next)
    if (c->name && !strcmp(local(c->name), name))
      return c;
  return NULL;
}

/* GetResourceProperty job:NAME of `job`: its element (a DOM node), NULL when the job has no such property (or the
   call failed: *ok is 0 then). QName content: gSOAP declares job on the Envelope, so the Body lists it. */
static struct soap_dom_element *property(struct soap *soap, const char *job, const char *name, int *ok)
{
  struct _rp__GetResourcePropertyResponse prop;
  char qname[64];
  const char *problem = NULL;
  snprintf(qname, sizeof(qname), "job:%s", name);
  sign(soap, "GetResourceProperty", job);
  soap_wsse_set_InclusiveNamespaces(soap, "job");
  *ok = soap_call___jobw__GetResourceProperty(soap, url, NULL, soap_strdup(soap, qname), &prop) == SOAP_OK
        && !(problem = answer_problem(soap));
  soap_wsse_set_InclusiveNamespaces(soap, NULL);
  if (problem)
    fprintf(stderr, "GetResourceProperty %s: %s\n", name, problem);
  return *ok && prop.__size > 0 ? &prop.__any[0] : NULL;
}

static const char *state(struct soap *soap, const char *job)
{
  int ok;
  struct soap_dom_element *el = property(soap, job, "State", &ok);
  return ok && el && el->text ? el->text : NULL;
}

/* Poll State until it is `wanted` or final. */
static const char *until(struct soap *soap, const char *job, const char *wanted)
{
  const char *s = NULL;
  int i;
  for (i = 0; i < 600; i++)
  {
    s = state(soap, job);
    if (!s || !strcmp(s, wanted) || !strcmp(s, "Done") || !strcmp(s, "Failed") || !strcmp(s, "Cancelled"))
      break;
    usleep(100000);
  }
  return s;
}

/* SubmitJob of `argc` words; returns the job's key (the JobKey reference parameter), or NULL. */
static char *submit(struct soap *soap, const char *step, int argc, char **argv)
{
  struct _job__SubmitJob req;
  struct _job__SubmitJobResponse resp;
  const char *problem = NULL;
  char *found;
  memset(&req, 0, sizeof(req));
  req.executable = argv[0];
  req.__sizeargument = argc - 1;
  req.argument = argv + 1;
  req.lifetime = "600";
  sign(soap, "SubmitJob", NULL);
  if (soap_call___jobw__SubmitJob(soap, url, NULL, &req, &resp) == SOAP_OK && !(problem = answer_problem(soap))
      && resp.Job && resp.Job->wsa5__EndpointReference.ReferenceParameters
      && resp.Job->wsa5__EndpointReference.ReferenceParameters->__size > 0
      && (found = strstr(resp.Job->wsa5__EndpointReference.ReferenceParameters->__any[0], "job-")))
  { /* the JobKey reference parameter arrives as raw XML: job- and 32 hex digits */
    found = soap_strdup(soap, found);
    found[36] = '\0';
    if (step)
      report(soap, step, 1, found);
    return found;
  }
  if (step)
    report(soap, step, 0, problem ? problem : "no job in the answer");
  return NULL;
}

/* The typed fault of the last call, checked: `want` is the fault element's name in the detail. */
static void expect_fault(struct soap *soap, const char *step, int status, const char *want)
{
  const char *problem;
  struct SOAP_ENV__Detail *d = soap->fault ? soap->fault->detail : NULL;
  const char *got = !d ? NULL : d->f__IllegalTransitionFault ? "IllegalTransitionFault"
                  : d->f__ResourceUnknownFault ? "ResourceUnknownFault"
                  : d->f__InvalidArgumentFault ? "InvalidArgumentFault" : d->f__AccessDeniedFault ? "AccessDeniedFault"
                  : d->f__InternalFault ? "InternalFault" : NULL;
  if (status != SOAP_FAULT || !got || strcmp(got, want))
  {
    fprintf(stderr, "%s: status %d, fault %s\n", step, status, got ? got : "untyped");
    report(soap, step, 0, "no typed fault");
    return;
  }
  if ((problem = answer_problem(soap)))
  {
    report(soap, step, 0, problem);
    return;
  }
  soap->error = SOAP_OK;
  report(soap, step, 1, got);
}

int main(int argc, char **argv)
{
  struct soap *soap;
  FILE *f;
  char *echo[] = {"/bin/echo", "hello from a job"}, *sleeper[] = {"/bin/sh", "-c", "trap '' TERM; sleep 300"}, *empty[] = {""};
  char *done_key, *long_key;
  char outputs[4096];
  const char *s, *problem = NULL;
  int ok, i;
  struct soap_dom_element *el, *file;
  if (argc != 7 && argc != 8)
    return 2;
  url = argv[1];
  host_cn = argv[5];
  if (argc == 8)
  {
    f = fopen(argv[7], "rb");
    if (!f)
      return 2;
    pkipath = malloc(65536);
    pkipath_size = (int)fread(pkipath, 1, 65536, f);
    fclose(f);
  }
  f = fopen(argv[2], "r"); cert = PEM_read_X509(f, NULL, NULL, NULL); fclose(f);
  f = fopen(argv[3], "r"); key = PEM_read_PrivateKey(f, NULL, NULL, NULL); fclose(f);
  /* SOAP_XML_STRICT: gSOAP validates each answer against the schema as it reads it */
  soap = soap_new1(SOAP_XML_CANONICAL | SOAP_XML_STRICT);
  soap_register_plugin(soap, soap_wsse);
  soap_register_plugin(soap, soap_wsa);
  if (soap_ssl_client_context(soap, SOAP_SSL_DEFAULT, NULL, NULL, argv[4], NULL, NULL))
  {
    soap_print_fault(soap, stderr);
    return 1;
  }

  if (!(done_key = submit(soap, "SubmitJob", 2, echo)))
    return 1;
  s = until(soap, done_key, "Done");
  report(soap, "State", s != NULL, s ? s : "no State");

  {
    struct _job__ListJobs req;
    struct _job__ListJobsResponse resp;
    enum xsd__boolean yes = xsd__boolean__true_;
    char listed[64] = "";
    req.includeEnded = &yes;
    sign(soap, "ListJobs", NULL);
    if (soap_call___jobw__ListJobs(soap, url, NULL, &req, &resp) == SOAP_OK && !(problem = answer_problem(soap)))
    {
      for (i = 0; i < resp.__sizeJob; i++)
      {
        struct wsa5__ReferenceParametersType *p = resp.Job[i].wsa5__EndpointReference.ReferenceParameters;
        if (p && p->__size > 0 && strstr(p->__any[0], done_key))
          snprintf(listed, sizeof(listed), "%s %d", soap_job__StateType2s(soap, resp.Job[i].State),
                   resp.Job[i].ExitCode ? *resp.Job[i].ExitCode : -999);
      }
      report(soap, "ListJobs", listed[0] != '\0', listed[0] ? listed : "the job is not listed");
    }
    else
      report(soap, "ListJobs", 0, problem);
  }

  el = property(soap, done_key, "Outputs", &ok);
  outputs[0] = '\0';
  for (file = el ? el->elts : NULL; file; file = file->next)
  {
    if (!file->name || strcmp(local(file->name), "file"))
      continue;
    snprintf(outputs + strlen(outputs), sizeof(outputs) - strlen(outputs), "%s%s %s %s", outputs[0] ? ";" : "",
             child(file, "name") ? child(file, "name")->text : "?", child(file, "size") ? child(file, "size")->text : "?",
             child(file, "sha256") ? child(file, "sha256")->text : "?");
  }
  report(soap, "Outputs", ok && el, outputs);
  el = property(soap, done_key, "CancelRequested", &ok);
  report(soap, "CancelRequestedAfterEnd", ok, el ? el->text : "absent");
  el = property(soap, done_key, "ResourceBounds", &ok);
  i = 0;
  for (file = el ? el->elts : NULL; file; file = file->next)
    if (file->name && !strcmp(local(file->name), "event"))
      i++;
  snprintf(outputs, sizeof(outputs), "%d events", i);
  report(soap, "ResourceBounds", ok, el ? outputs : "absent");

  if (!(long_key = submit(soap, "SubmitLongJob", 3, sleeper)))
    return 1;
  until(soap, long_key, "Active");
  {
    struct _job__Cancel req;
    struct _job__CancelResponse resp;
    sign(soap, "Cancel", long_key);
    if (soap_call___jobw__Cancel(soap, url, NULL, &req, &resp) == SOAP_OK && !(problem = answer_problem(soap)))
      report(soap, "Cancel", 1, soap_job__StateType2s(soap, resp.State));
    else
      report(soap, "Cancel", 0, problem);
  }
  el = property(soap, long_key, "CancelRequested", &ok);
  report(soap, "CancelRequested", ok, el ? el->text : "absent");
  s = until(soap, long_key, "Cancelled");
  report(soap, "Cancelled", s != NULL, s ? s : "no State");
  {
    struct _job__Cancel req;
    struct _job__CancelResponse resp;
    sign(soap, "Cancel", long_key);
    expect_fault(soap, "IllegalTransitionFault", soap_call___jobw__Cancel(soap, url, NULL, &req, &resp),
                 "IllegalTransitionFault");
  }
  for (i = 0; i < 2; i++)
  {
    struct _rl__Destroy req;
    struct _rl__DestroyResponse resp;
    sign(soap, "Destroy", i == 0 ? done_key : long_key);
    if (soap_call___jobw__Destroy(soap, url, NULL, &req, &resp) == SOAP_OK && !(problem = answer_problem(soap)))
      report(soap, i == 0 ? "Destroy" : "DestroyLong", 1, "destroyed");
    else
      report(soap, i == 0 ? "Destroy" : "DestroyLong", 0, problem);
  }
  {
    struct _rp__GetResourcePropertyResponse prop;
    sign(soap, "GetResourceProperty", argv[6]);
    soap_wsse_set_InclusiveNamespaces(soap, "job");
    expect_fault(soap, "ResourceUnknownFault",
                 soap_call___jobw__GetResourceProperty(soap, url, NULL, "job:State", &prop), "ResourceUnknownFault");
    soap_wsse_set_InclusiveNamespaces(soap, NULL);
  }
  {
    struct _job__SubmitJob req;
    struct _job__SubmitJobResponse resp;
    memset(&req, 0, sizeof(req));
    req.executable = empty[0];            /* the schema's executable is a non-empty string */
    sign(soap, "SubmitJob", NULL);
    expect_fault(soap, "InvalidArgumentFault", soap_call___jobw__SubmitJob(soap, url, NULL, &req, &resp),
                 "InvalidArgumentFault");
  }
  soap_destroy(soap);
  soap_end(soap);
  soap_free(soap);
  return failed;
}
