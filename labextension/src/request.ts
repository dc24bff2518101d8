import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/**
 * One kernelprov environment as `GET /kernelprov/envs` describes it (see kernelprov/serverext.py).
 */
export interface IEnvironment {
  name: string;
  display_name: string;
  language: string;
  archive: string | null;
  archive_size: number | null;
  format: string | null;
  python_version: string | null;
  packages: number | null;
  staged: {
    prefix: string;
    bytes: number;
    staged_at: number;
    last_used: number;
    in_use: number;
  } | null;
  staging: {
    done: number;
    total: number;
    fraction: number | null;
    started_at: number;
    error: string | null;
  } | null;
  problems: string[];
}

export interface IEnvironmentList {
  envs: IEnvironment[];
  cache_dir: string;
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
  const url = URLExt.join(serverSettings.baseUrl, 'kernelprov', endPoint);
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
