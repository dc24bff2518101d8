import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/**
 * One kernelprov environment as `GET /kernelprov/envs` describes it (kernelprov/jupyter/environments.py).
 */
export interface IEnvironment {
  name: string;
  display_name: string;
  language: string;
  archive: string | null;
  archive_size: number | null;
  format: string | null;
  python_version: string | null;
  /** conda records in the env (from the manifest written at pack time) */
  packages: number | null;
  /** pip-installed distributions no conda record owns (manifest; null when unknown) */
  pip_packages: number | null;
  staged: {
    prefix: string;
    bytes: number;
    staged_at: number;
    last_used: number;
    /** whether any kernel has run from this staged copy yet */
    used?: boolean;
    in_use: number;
  } | null;
  staging: IStaging | null;
  /** a Slurm kernel's jobs started by this server (null: the kernel runs where the server does) */
  slurm_jobs?: ISlurmJob[] | null;
  /** the last failed stage of this archive version on this node */
  last_failure: { message: string; at: number } | null;
  problems: string[];
}

/** The batch job of one running Slurm kernel. */
export interface ISlurmJob {
  kernel_id: string;
  job_id: string;
  state: string;
  reason: string;
  node: string;
  /** "Pending: Resources", "Running on n1" */
  description: string;
}

/** A stage under way (from the panel, a notebook start or a job prologue), or the panel's failed one. */
export interface IStaging {
  done: number;
  total: number;
  fraction: number | null;
  started_at: number;
  /** seconds since it started, by the server's clock */
  elapsed?: number;
  error: string | null;
}

export interface IEnvironmentList {
  envs: IEnvironment[];
  cache_dir: string;
}

/** `GET /kernelprov/staging?name=...`: the fast poll's answer. */
export interface IStagingStates {
  envs: {
    [name: string]: {
      staging: IStaging | null;
      staged: boolean;
      slurm_jobs?: ISlurmJob[] | null;
    };
  };
}

/**
 * The server API the model works over; `ServerAPI` is the real one, unit tests pass their own.
 */
export interface IEnvironmentsAPI {
  list(): Promise<IEnvironmentList>;
  staging(names: string[]): Promise<IStagingStates>;
  stage(name: string): Promise<IEnvironment>;
  evict(name: string): Promise<IEnvironment>;
}

/** The kernelprov server extension's REST API, through JupyterLab's authenticated requests. */
export class ServerAPI implements IEnvironmentsAPI {
  constructor(serverSettings: ServerConnection.ISettings) {
    this._settings = serverSettings;
  }

  list(): Promise<IEnvironmentList> {
    return requestAPI<IEnvironmentList>('envs', this._settings);
  }

  staging(names: string[]): Promise<IStagingStates> {
    const query = names.map(n => `name=${encodeURIComponent(n)}`).join('&');
    return requestAPI<IStagingStates>(`staging?${query}`, this._settings);
  }

  stage(name: string): Promise<IEnvironment> {
    return requestAPI<IEnvironment>(stagePath(name), this._settings, {
      method: 'POST'
    });
  }

  evict(name: string): Promise<IEnvironment> {
    return requestAPI<IEnvironment>(stagePath(name), this._settings, {
      method: 'DELETE'
    });
  }

  private _settings: ServerConnection.ISettings;
}

/**
 * Call the kernelprov server extension under `<base_url>/kernelprov/`.
 *
 * `ServerConnection.makeRequest` adds the token and the XSRF header that the server checks on
 * writes. A non-2xx answer throws a `ResponseError` carrying the server's one-sentence message.
 */
export async function requestAPI<T>(
  endPoint: string,
  serverSettings: ServerConnection.ISettings,
  init: RequestInit = {}
): Promise<T> {
  const [path, query] = endPoint.split('?', 2);
  const url =
    URLExt.join(serverSettings.baseUrl, 'kernelprov', path) +
    (query ? `?${query}` : '');
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, serverSettings);
  } catch (error) {
    throw new ServerConnection.NetworkError(error as TypeError);
  }
  const text = await response.text();
  let data: any = text;
  if (text.length > 0) {
    try {
      data = JSON.parse(text);
    } catch (error) {
      console.warn('kernelprov: not a JSON response', response);
    }
  }
  if (!response.ok) {
    throw new ServerConnection.ResponseError(response, data?.message || text);
  }
  return data as T;
}

/**
 * The URL path of one environment's stage resource; names are URL-encoded, never paths.
 */
export function stagePath(name: string): string {
  return URLExt.join('envs', encodeURIComponent(name), 'stage');
}
